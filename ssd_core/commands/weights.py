"""`ssd weights list|download`: the pretrained weights registry, and pre-fetching it for clusters
without internet access."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="list named pretrained weights, or download them (to the torch.hub cache or a mirror)",
        description="Named pretrained weights (`--weights` / `--weights-backbone` of train, eval, predict, "
        "detect). Files live in torch.hub's cache ($TORCH_HOME/hub/checkpoints, shared with torchvision).",
    )
    sub = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="the registry: arch, name, source, size, published COCO AP, cached")
    listing.add_argument("--arch", default=None, help="only this architecture (and its backbone)")
    listing.set_defaults(func=run_list)
    download = sub.add_parser(
        "download", help="fetch weights into the cache (and copy them to --to)",
        description="Fetch weights into the torch.hub cache, hash-checked. NAME is a full registry name "
        "(ssd300_vgg16.COCO_V1, vgg16.IMAGENET1K_FEATURES), torchvision's (ResNet50_Weights.IMAGENET1K_V2), "
        "an architecture (its DEFAULT weights and DEFAULT backbone) or an http(s) URL. With --to DIR|s3://..., "
        "the files are also copied there under their own names: point SSD_WEIGHTS_MIRROR at it on machines "
        "without internet, or pass a copied file as --weights.",
    )
    download.add_argument("names", nargs="+", metavar="NAME")
    download.add_argument("--to", default=None, metavar="DIR|s3://...", help="also copy the files here (a mirror)")
    download.add_argument("--no-progress", action="store_true", help="no progress bars")
    download.set_defaults(func=run_download)


def _size(entry) -> str:
    from ssd_core.weights import cached_file

    path = cached_file(entry)
    if path is not None:
        return f"{path.stat().st_size / 1e6:.1f} MB"
    return f"{entry.file_size_mb:.1f} MB" if entry.file_size_mb else "?"


def registry_rows(arch: str | None = None) -> list[dict[str, str]]:
    from ssd_core.weights import cached_file, list_weights
    from ssd_core.zoo import CONFIGS

    rows = []
    for entry in list_weights(arch):
        if entry.kind == "detector":
            used_by = entry.arch
            default = "DEFAULT" if CONFIGS[entry.arch].default_weights == entry.full_name else ""
        else:
            users = [a for a, c in CONFIGS.items() if c.backbone == entry.arch]
            used_by = "backbone of " + ", ".join(users)
            defaults = {c.default_backbone_weights for c in CONFIGS.values()}
            default = "DEFAULT backbone" if entry.full_name in defaults else ""
        rows.append({
            "name": entry.full_name, "for": used_by, "default": default, "source": entry.source,
            "size": _size(entry), "COCO AP": f"{entry.coco_ap:.1f}" if entry.coco_ap is not None else "-",
            "cached": "yes" if cached_file(entry) else "no",
        })
    for name, config in CONFIGS.items():
        if config.default_weights is None and (arch is None or arch == name):
            rows.append({"name": "-", "for": name, "default": f"backbone only ({config.default_backbone_weights})",
                         "source": "no published COCO weights", "size": "-", "COCO AP": "-", "cached": "-"})
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    names = list(rows[0])
    widths = [max(len(n), *(len(r[n]) for r in rows)) for n in names]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip()]
    lines += ["  ".join(r[n].ljust(w) for n, w in zip(names, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    from ssd_core.weights import _checkpoint_dir

    print(format_table(registry_rows(args.arch)))
    print(f"(cache: {_checkpoint_dir()})")
    return 0


def _entries_for(name: str) -> list:
    from ssd_core.weights import get_weights
    from ssd_core.zoo import CONFIGS

    if name in CONFIGS:  # an architecture: what it uses by default
        config = CONFIGS[name]
        return [get_weights(n) for n in (config.default_weights, config.default_backbone_weights) if n]
    entry = get_weights(name)
    return [entry] if entry is not None else [name]


def run_download(args: argparse.Namespace) -> int:
    from ssd_core.weights import copy_to, weights_file

    progress = not args.no_progress
    for name in args.names:
        for entry in _entries_for(name):
            if isinstance(entry, str):  # a URL
                if "://" not in entry or entry.startswith("s3://"):
                    raise ValueError(f"{entry!r} is neither a registry name nor an http(s) URL")
                path = weights_file(entry, progress=progress)
                print(path)
                if args.to:
                    raise ValueError("--to copies registry names only; download the URL, then copy the file")
                continue
            path = weights_file(entry, progress=progress)
            print(f"{entry.full_name}: {path}")
            if args.to:
                print(f"{entry.full_name}: copied to {copy_to(entry, args.to, progress=progress)}")
    return 0
