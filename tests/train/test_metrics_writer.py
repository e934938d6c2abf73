"""MetricWriter: JSONL round trip and resume; event files read back by TensorBoard itself."""

import glob
import json
import os

import numpy as np
import pytest

from xbm_jax.train.metrics_writer import MetricWriter


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_jsonl_round_trip_and_resume(tmp_path):
  wd = str(tmp_path)
  with MetricWriter(wd, tensorboard=False) as w:
    for s in range(1, 6):
      w.write_scalars(s, {"train/loss": np.float32(1.0 / s), "train/lr": s})
  got = _lines(wd)
  assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
  assert got[1] == {"step": 2, "train/loss": pytest.approx(0.5), "train/lr": 2.0}
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 6, "train/lo')  # a crash mid-line
  with MetricWriter(wd, resume_step=3, tensorboard=False) as w:
    w.write_scalars(4, {"train/loss": 9.0})
  got = _lines(wd)
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  assert got[-1]["train/loss"] == 9.0
  with pytest.raises(ValueError, match="not a scalar"):
    MetricWriter(wd, tensorboard=False).write_scalars(1, {"x": [1, 2]})


def test_disabled_writer_writes_nothing(tmp_path):
  w = MetricWriter(str(tmp_path / "off"), enabled=False)
  w.write_scalars(1, {"a": 1.0})
  w.close()
  assert not (tmp_path / "off").exists()


def test_event_file_parses_with_tensorboard(tmp_path):
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_accumulator, event_file_loader

  # TensorBoard takes any path whose name contains "tfevents" for a file, and
  # pytest names tmp_path after the test: use a sub-folder.
  wd = str(tmp_path / "run")
  img = np.zeros((6, 10, 3), np.uint8)
  img[:, :5, 1] = 200
  with MetricWriter(wd) as w:
    for s in range(1, 6):
      w.write_scalars(s, {"train/loss": 1.0 / s, "eval/sop/recall@1": 0.1 * s})
    w.write_image(3, "pictures/retrieval", img)
    w.write_config({"label": "xbm", "xbm": {"size": 8000}})
  # A restart from step 3: TensorBoard must drop the first file's steps 4 and 5.
  with MetricWriter(wd, resume_step=3) as w:
    w.write_scalars(4, {"train/loss": 7.0})
  assert len(glob.glob(os.path.join(wd, "events.out.tfevents.*"))) == 2

  acc = event_accumulator.EventAccumulator(wd, size_guidance={"images": 0})
  acc.Reload()
  loss = acc.Scalars("train/loss")
  assert [e.step for e in loss] == [1, 2, 3, 4]
  assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3, 7.0])
  (pic,) = acc.Images("pictures/retrieval")
  assert (pic.step, pic.height, pic.width) == (3, 6, 10)
  # The raw protos (LegacyEventFileLoader does not migrate images to tensors).
  first = sorted(glob.glob(os.path.join(wd, "events.out.tfevents.*")))[0]
  events = list(event_file_loader.LegacyEventFileLoader(first).Load())
  assert events[0].file_version == "brain.Event:2"
  images = [v for e in events for v in e.summary.value if v.HasField("image")]
  assert len(images) == 1 and images[0].tag == "pictures/retrieval"
  im = images[0].image
  assert (im.height, im.width, im.colorspace) == (6, 10, 3)
  from PIL import Image
  import io

  assert (np.asarray(Image.open(io.BytesIO(im.encoded_image_string))) == img).all()
  texts = [v for e in events for v in e.summary.value if v.tag.startswith("config")]
  assert texts and texts[0].metadata.plugin_data.plugin_name == "text"
  assert b'"size": 8000' in texts[0].tensor.string_val[0]
  recall = [v.simple_value for e in events for v in e.summary.value if v.tag == "eval/sop/recall@1"]
  assert recall == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["xbm"]["size"] == 8000
