"""Copy the redistributable task subsets (PAWS-X, XNLI) into the package, gzip-compressed.

Run once by maintainers from a checkout that has the curated subsets beside it:
    python scripts/bundle_data.py /path/to/curated/data
MARC is never bundled: Amazon's licence forbids republishing it.
"""

import gzip
import sys
from pathlib import Path

TASKS = ("pawsx", "xnli")
DEST = Path(__file__).resolve().parents[1] / "datamodules" / "bundled"


def main(source: str) -> None:
    src = Path(source)
    for task in TASKS:
        for path in sorted((src / task).glob("*/*.jsonl")):
            out = DEST / task / path.parent.name / (path.name + ".gz")
            out.parent.mkdir(parents=True, exist_ok=True)
            # mtime=0 keeps the archive byte-identical across rebuilds.
            with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as f:
                f.write(path.read_bytes())
            print(out.relative_to(DEST))


if __name__ == "__main__":
    main(sys.argv[1])
