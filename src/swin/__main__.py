"""`python -m swin ...` is the `swin` command (also what torchrun runs: torchrun -m swin train ...)."""
from .cli import main

raise SystemExit(main())
