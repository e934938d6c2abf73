"""The names of the files a run writes into its workdir (one definition, read by the
writer, the trainer and the report)."""

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
