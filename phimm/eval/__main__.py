"""`python -m phimm.eval asr ...` / `python -m phimm.eval vqa ...`"""

import sys

from phimm.eval import main

sys.exit(main())
