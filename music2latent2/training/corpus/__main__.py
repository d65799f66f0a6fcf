"""Command line of the corpus builder: ``python -m music2latent2.training.corpus {build,pack,unpack,verify}``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from .build import BuildConfig, build
from .parts import pack, unpack, verify
from .sources import CorpusError


def _build(args: argparse.Namespace) -> int:
    cfg = BuildConfig(out=args.out, cache=args.cache, music_hours=args.music_hours, midi_hours=args.midi_hours,
                      speech_hours=args.speech_hours, synthetic_speech_share=args.synthetic_speech_share,
                      per_source_hours=args.per_source_hours, min_seconds=args.min_seconds,
                      min_bandwidth_hz=args.min_bandwidth_khz * 1000, valid_fraction=args.valid_fraction,
                      real=args.real, midi_dir=args.midi_dir, soundfonts=tuple(args.soundfont or ()),
                      exclude=tuple(args.exclude or ()), jobs=args.jobs, seed=args.seed,
                      install_tools=not args.no_install_tools, overwrite=args.overwrite)
    build(cfg)
    if args.part_mib > 0:
        pack(args.out, args.parts or args.out.with_name(args.out.name + ".parts"), args.part_mib, args.seed)
    return 0


def _pack(args: argparse.Namespace) -> int:
    pack(args.corpus, args.out, args.part_mib, args.seed)
    return 0


def _unpack(args: argparse.Namespace) -> int:
    for part in args.parts:
        unpack(part, args.into)
    return 0


def _verify(args: argparse.Namespace) -> int:
    counts = verify(args.corpus, complete=not args.partial)
    print(f"{args.corpus}: {counts['ok']} files match the manifest, {counts['absent']} absent")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m music2latent2.training.corpus",
                                 description="Build, pack and verify the offline training corpus.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download packages, render, write OUT/ with manifest.json, then carry parts")
    b.add_argument("--out", type=Path, required=True, help="corpus folder to create")
    b.add_argument("--music-hours", type=float, default=24.0, help="real music (Debian packages)")
    b.add_argument("--midi-hours", type=float, default=5.0, help="General MIDI renders of music21 scores")
    b.add_argument("--speech-hours", type=float, default=2.5, help="speech, real and synthetic")
    b.add_argument("--synthetic-speech-share", type=float, default=0.15, help="share of speech from espeak-ng")
    b.add_argument("--per-source-hours", type=float, default=2.0, help="most hours from any one package")
    b.add_argument("--part-mib", type=float, default=60.0, help="size of carry parts (0: do not pack)")
    b.add_argument("--parts", type=Path, default=None, help="folder for the parts (default OUT.parts)")
    b.add_argument("--cache", type=Path, default=BuildConfig.cache, help="downloaded and extracted packages")
    b.add_argument("--real", type=Path, default=None, help="also add these recordings (sub-folder = source)")
    b.add_argument("--midi-dir", type=Path, default=None, help="render these .mid files instead of music21's")
    b.add_argument("--soundfont", action="append", help=".sf2 to render MIDI with (repeat; default: 3 from Debian)")
    b.add_argument("--exclude", action="append", help="leave out this package (repeat)")
    b.add_argument("--min-seconds", type=float, default=30.0, help="shortest music or MIDI track (speech: 10 s)")
    b.add_argument("--min-bandwidth-khz", type=float, default=16.0, help="drop music band-limited below this")
    b.add_argument("--valid-fraction", type=float, default=0.02, help="whole tracks held out for validation")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-install-tools", action="store_true",
                   help="do not apt-get install openmpt123, lmms, espeak-ng when missing (skip what needs them)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new one is whole)")
    b.set_defaults(func=_build)
    p = sub.add_parser("pack", help="corpus folder -> carry parts")
    p.add_argument("corpus", type=Path)
    p.add_argument("--out", type=Path, default=Path(".carry"))
    p.add_argument("--part-mib", type=float, default=60.0, help="largest part (MiB)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_pack)
    u = sub.add_parser("unpack", help="verify and extract parts")
    u.add_argument("parts", type=Path, nargs="+")
    u.add_argument("--into", type=Path, required=True)
    u.set_defaults(func=_unpack)
    v = sub.add_parser("verify", help="check a corpus folder against its manifest's sha256s")
    v.add_argument("corpus", type=Path)
    v.add_argument("--partial", action="store_true", help="files absent from the folder are not errors")
    v.set_defaults(func=_verify)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
