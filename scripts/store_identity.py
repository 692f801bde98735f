"""Build one store of every kind through the CLI and record each file's SHA-256 (the restructure check).

Run it at two commits and compare the two JSON files: every file must match, except the group
metadata's creation time and softcache version, which are printed apart. Usage:

    python scripts/store_identity.py OUT_DIR > digests.json
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["--teacher", "tests.helpers.specs:teacher", "--dataset", "tests.helpers.specs:dataset"]
TOKENS = [
    "--lm",
    "--teacher",
    "tests.helpers.token_specs:causal_teacher",
    "--dataset",
    "tests.helpers.token_specs:ragged_dataset",
    "--shard-rows",
    "16",
    "--batch-size",
    "3",
]
KINDS = {
    "dense": [*ROWS, "--shard-rows", "64", "--batch-size", "24"],
    "topk": [
        *ROWS,
        "--shard-rows",
        "64",
        "--batch-size",
        "24",
        "--encoding",
        "topk",
        "--top-k",
        "5",
        "--dtype",
        "float32",
    ],
    "views": [
        "--teacher",
        "tests.helpers.specs:conv_teacher",
        "--dataset",
        "tests.helpers.specs:dataset",
        "--shard-rows",
        "64",
        "--batch-size",
        "24",
        "--views",
        "4",
        "--augment",
        "crop(size=8,scale=0.5:1);flip",
        "--augment-seed",
        "7",
    ],
    "tokens-topk": [*TOKENS, "--encoding", "topk", "--top-k", "8", "--value-bits", "7"],
    "tokens-sampled": [*TOKENS, "--encoding", "sampled", "--draws", "12"],
}
VOLATILE = ("created", "softcache_version", "output")


def digests(path: Path) -> dict[str, str]:
    out = {}
    for p in sorted(path.rglob("*")):
        if not p.is_file():
            continue
        name = str(p.relative_to(path))
        data = p.read_bytes()
        if name == "zarr.json":  # the group metadata: drop what differs by time and place
            attrs = json.loads(data)
            meta = attrs.get("attributes", {}).get("softcache", {})
            for key in VOLATILE:
                meta.pop(key, None)
            build = meta.get("build", {})
            build.pop("output", None)
            data = json.dumps(attrs, sort_keys=True).encode()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def main() -> None:
    base = Path(sys.argv[1])
    base.mkdir(parents=True, exist_ok=True)
    result = {}
    for kind, args in KINDS.items():
        out = base / f"{kind}.zarr"
        cmd = [
            sys.executable,
            "-m",
            "softcache.cli",
            "build",
            *args,
            "--device",
            "cpu",
            "-q",
            "--overwrite",
            "-o",
            str(out),
        ]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        result[kind] = digests(out)
    json.dump(result, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
