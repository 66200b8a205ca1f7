"""`make demo`: the pipeline on the embedded default (grows as the pipeline is built)."""

from __future__ import annotations

import subprocess
import sys


def main() -> int:
    print("cocoa demo: building a small dataset and inspecting it")
    from PIL import Image

    from .records import ImageRef, PairRecord
    from .shards import Workspace, write_records

    ws = Workspace("demo/shards")
    recs = [
        PairRecord(source="demo", qry_image=ImageRef.from_pil(Image.new("RGB", (56, 56), c)), qry_text="What colour?",
                   pos_text=name)
        for name, c in [("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220))]
    ]
    write_records(ws.original, "PairRecord", recs, overwrite=True)
    return subprocess.call([sys.executable, "-m", "cocoa.cli.data", "inspect", str(ws.original)])


if __name__ == "__main__":
    sys.exit(main())
