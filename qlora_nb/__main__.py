"`python -m qlora_nb`: the same command line as `qlora-nb` (see nbs/13_cli.ipynb)."
import sys
from qlora_nb.cli import main

sys.exit(main())
