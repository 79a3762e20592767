"""``python -m fewstep.training.cli``, as ``torchrun`` and ``accelerate launch`` start it."""

from . import main

raise SystemExit(main())
