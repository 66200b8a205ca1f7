"""The README's `datasets` recipe, run as written, on every dataset directory the pipeline writes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _readme_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    hits = [b for b in blocks if 'load_dataset("arrow"' in b]
    assert len(hits) == 1, "the README has one datasets recipe"
    return hits[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("readme")
    run = lambda *a: subprocess.run([str(BIN / a[0]), *a[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)  # noqa: E731
    r = run("cocoa-data", "synth", "--source", "scenes", "--scenes-n", "16", "--out", "shards/", "--no-progress",
            "--commit-every", "8")
    assert r.returncode == 0, r.stderr
    r = run("cocoa-data", "curate", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run("cocoa-data", "mix", "--ratio", "1:1", "--no-progress")
    assert r.returncode == 0, r.stderr
    return cwd


@pytest.mark.parametrize("directory", ["original", "synthetic", "synthetic/quarantine", "curated",
                                       "curated/rejected", "mix"])
def test_readme_datasets_recipe_reads_every_dataset_directory(workspace, directory):
    import json

    code = _readme_snippet()
    assert 'os.chdir("shards/original")' in code
    m = json.loads((workspace / "shards" / directory / "manifest.json").read_text())
    if m["num_rows"] == 0:  # what the README says of an empty dataset: no shards, check num_rows first
        assert m["shards"] == [] and m["complete"]
        return
    if directory != "original":
        code = code.replace('os.chdir("shards/original")', f'os.chdir("shards/{directory}")')
    code = code.replace('ds[0]["qry_image"]', "ds")  # the image column is named per record type
    code += (
        "\nimport json as _j\n"
        "_m = _j.load(open('manifest.json'))\n"
        "assert ds.num_rows == _m['num_rows'], (ds.num_rows, _m['num_rows'])\n"
        "_img = [c for c in ('qry_image', 'image') if c in ds.column_names]\n"
        "if ds.num_rows and _img:\n"
        "    _v = next((r[_img[0]] for r in ds if r[_img[0]] is not None), None)\n"
        "    assert _v is None or hasattr(_v, 'size'), type(_v)  # decoded to PIL\n"
        "print('rows', ds.num_rows)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=workspace, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith("rows")


def test_readme_snippet_literally_on_original(workspace):
    r = subprocess.run([sys.executable, "-c", _readme_snippet() + "\nprint(type(ds[0]['qry_image']).__name__)"],
                       cwd=workspace, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Image" in r.stdout
