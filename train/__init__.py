"""The trainer: Lightning over rwkv_lm models. Run `python -m train --help`; see train/README.md."""
