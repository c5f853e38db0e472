"""``python -m jaxtl.convert SRC --arch ARCH --out DST``: convert weights to a jaxtl safetensors file."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from jaxtl.convert.io import save_variables
from jaxtl.convert.mapping import ConversionError
from jaxtl.convert.registry import REGISTRY, HashMismatchError, PretrainedUnavailableError, convert_file, fetch
from jaxtl.convert.torch_pickle import TorchFileError, UnsafePickleError
from jaxtl.models import ARCHS

EPILOG = """\
SRC is a local file or a registry name (downloaded once into the cache and verified):
{names}

Formats (--format auto detects from the file's bytes):
  torchvision  torch.save(model.state_dict()) .pth file (zip or legacy); read with a restricted
               unpickler that never imports torch or runs code
  timm         timm ResNet .safetensors (e.g. Hugging Face timm/resnet50.a1_in1k model.safetensors)

Output: a safetensors file with '/'-joined variable paths (params/body/conv1/kernel,
batch_stats/body/bn1/mean, params/head/fc/kernel when the source has fc) and metadata
format=jaxtl, arch, head (linear|none), num_classes. Use it as model.pretrained=DST, or in Python:
  variables, meta = jaxtl.convert.load_variables(DST)

Examples:
  python -m jaxtl.convert resnet34-b627a593.pth --arch resnet34 --out resnet34.safetensors
  python -m jaxtl.convert resnet50.a1_in1k --arch resnet50 --out r50_a1.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxtl.convert",
        description="Convert torchvision .pth / timm .safetensors ResNet weights into jaxtl's weight format.",
        epilog=EPILOG.format(names=textwrap.fill(", ".join(sorted(REGISTRY)), 96, initial_indent="  ",
                                                  subsequent_indent="  ")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="weights file (.pth / .safetensors) or a registry name")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS), help="ResNet the weights belong to")
    p.add_argument("--out", required=True, metavar="DST", help="output .safetensors path")
    p.add_argument("--format", default="auto", choices=["auto", "torchvision", "timm"],
                   help="source format (default: auto-detect)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="skip missing/unexpected/wrongly-shaped keys instead of failing")
    p.add_argument("--cache-dir", default=None,
                   help="download cache for registry names (default: $JAXTL_CACHE or ~/.cache/jaxtl/weights)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src, fmt, source_name = Path(args.src).expanduser(), args.format, args.src
    try:
        if not src.is_file():
            entry = REGISTRY.get(args.src)
            if entry is None:
                print(f"error: {args.src} is neither a file nor a registry name ({', '.join(sorted(REGISTRY))})",
                      file=sys.stderr)
                return 2
            if entry.arch != args.arch:
                print(f"error: {entry.name} holds {entry.arch} weights, not --arch {args.arch}", file=sys.stderr)
                return 2
            src, fmt, source_name = fetch(entry, args.cache_dir), entry.format, entry.url
        variables = convert_file(src, args.arch, fmt, strict=args.strict)
    except (ConversionError, UnsafePickleError, TorchFileError, HashMismatchError, PretrainedUnavailableError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    head = variables["params"].get("head", {})
    meta = {"arch": args.arch, "head": "linear" if "fc" in head else "none",
            "num_classes": str(head["fc"]["bias"].shape[0]) if "fc" in head else "0", "source": source_name}
    out = save_variables(args.out, variables, meta)
    n = sum(v.size for v in _leaves(variables["params"]))
    print(f"wrote {out} ({args.arch}, head={meta['head']}, {n:,} parameters)")
    return 0


def _leaves(tree: dict) -> list:
    out = []
    for v in tree.values():
        out.extend(_leaves(v) if isinstance(v, dict) else [v])
    return out


if __name__ == "__main__":
    sys.exit(main())
