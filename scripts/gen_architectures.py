"""Write docs/architectures.md from the architecture matrix (tests/arch_matrix.py).

OMP_NUM_THREADS=1 python scripts/gen_architectures.py            # writes the file
OMP_NUM_THREADS=1 python scripts/gen_architectures.py --stdout   # prints it
"""

from __future__ import annotations

import logging
import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(argv: list[str]) -> int:
    import arch_matrix
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    text = arch_matrix.render(arch_matrix.matrix())
    if "--stdout" in argv:
        sys.stdout.write(text)
    else:
        (ROOT / "docs" / "architectures.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
