"""The progress bar's ETA: shown between log steps, counting the evaluations due."""

import time

from xbm_jax.train.progress import Progress, format_seconds


def eta_shown(p) -> str:
  return dict(kv.split("=") for kv in p.bar.postfix.split(", "))["eta"]


def test_the_eta_refreshes_at_every_step_not_only_at_log_steps(capsys):
  p = Progress(total=100, start=0, eval_steps=[50, 100], enabled=True)
  p.bar.mininterval = 0  # redraw on every update
  shown = []
  for _ in range(6):
    time.sleep(0.02)
    p.update()  # no postfix() call: no log step in between
    shown.append(eta_shown(p))
  # From the second step on the bar knows a rate: ~0.02 s a step, 95+ steps left.
  minutes, seconds = (int(x) for x in shown[-1].split(":"))
  assert shown[0] == "?" and 0 < 60 * minutes + seconds < 60, shown
  p.evaluated(30.0)  # one evaluation took 30 s; two are due (steps 50 and 100)
  p.update()
  minutes, seconds = (int(x) for x in eta_shown(p).split(":"))
  assert 60 <= 60 * minutes + seconds < 120, eta_shown(p)
  p.close()
  assert "eta=" in capsys.readouterr().err


def test_format_seconds():
  assert [format_seconds(s) for s in (0, 59.6, 61, 3600 + 62)] == [
    "0:00",
    "1:00",
    "1:01",
    "1:01:02",
  ]
