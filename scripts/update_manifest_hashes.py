"""Record the sha256 of every shipped weights file in dqfast/models/weights/manifest.json.

    python scripts/update_manifest_hashes.py [--check]

Run it after (re)shipping a ``<preset>.safetensors``: the registry refuses to load a file whose
hash differs from ``manifest[preset]["sha256"]``. ``--check`` only compares and exits 1 on a
mismatch or a missing hash. Other keys of the manifest are kept; the file is rewritten atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dqfast.models.registry import MANIFEST_FILE, WEIGHTS_DIR, file_sha256  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="weights folder (default: the package's)")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on any difference")
    args = parser.parse_args(argv)

    manifest_path = args.weights / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    changed = []
    for path in sorted(args.weights.glob("*.safetensors")):
        name = path.name.removesuffix(".safetensors")
        digest = file_sha256(path)
        entry = manifest.setdefault(name, {})
        if entry.get("sha256") != digest:
            changed.append(name)
            entry["sha256"] = digest
        print(f"{digest}  {path.name}")
    if args.check:
        if changed:
            print(f"error: hashes differ or are missing for {', '.join(changed)}", file=sys.stderr)
            return 1
        return 0
    fd, tmp = tempfile.mkstemp(dir=args.weights, prefix=f".{MANIFEST_FILE}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, manifest_path)
    print(f"updated {manifest_path.name}: {', '.join(changed) or 'no change'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
