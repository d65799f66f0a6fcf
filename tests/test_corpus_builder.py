"""The corpus builder end to end on a tiny local fixture (no network): the rules, the manifest,
the validation split, carry parts and their verification, and its errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_corpus import _lowpassed_noise, midi_bytes, pretty_midi_soundfont

from music2latent2.training.corpus import BuildConfig, CorpusError, Source, build, pack, unpack, verify
from music2latent2.training.corpus.debian import fetch_packages

SR = 44100
SOURCES = (
    Source("fake-music", "music", "files", "CC0-1.0", 0.1),
    Source("fake-stems", "music", "stems", "CC-BY-SA-3.0", 0.1),
    Source("fake-tracker", "music", "tracker", "GPL-2+", 0.1, tool="no-such-renderer-m2l2"),
    Source("fake-speech", "speech", "speech_clips", "GPL-2+", 0.1),
)
FILE_KEYS = {"path", "kind", "source", "licence", "seconds", "split", "source_rate", "bandwidth_hz", "bytes",
             "sha256", "inputs"}


def _noise(seconds: float, seed: int, cutoff: float = 20000.0) -> np.ndarray:
    return _lowpassed_noise(cutoff, seconds, seed)


def _package(cache: Path, name: str) -> Path:
    tree = cache / "trees" / name
    (tree / "usr/share/doc" / name).mkdir(parents=True)
    (tree / "usr/share/doc" / name / "copyright").write_text(f"{name}: free to use\n")
    return tree / "usr/share/games" / name


def _fixture(root: Path) -> dict:
    cache = root / "cache"
    music = _package(cache, "fake-music")
    music.mkdir(parents=True)
    sf.write(str(music / "full.flac"), _noise(26, 1), SR)
    sf.write(str(music / "second.flac"), _noise(24, 2), SR)
    sf.write(str(music / "third.flac"), _noise(22, 3), SR)
    shutil.copyfile(music / "full.flac", music / "copy_of_full.flac")  # a duplicate
    sf.write(str(music / "short.flac"), _noise(8, 4), SR)  # under the minimum length
    sf.write(str(music / "muffled.flac"), _noise(25, 5, cutoff=9000), SR)  # band-limited
    sf.write(str(music / "lowrate.flac"), _noise(25, 6, cutoff=9000)[::2], SR // 2)  # sampled at 22.05 kHz
    stems = _package(cache, "fake-stems") / "songs" / "one"
    stems.mkdir(parents=True)
    sf.write(str(stems / "song.ogg"), _noise(23, 7), SR)
    sf.write(str(stems / "drums.ogg"), _noise(21, 8), SR)
    tracker = _package(cache, "fake-tracker")
    tracker.mkdir(parents=True)
    (tracker / "tune.mod").write_bytes(b"not rendered: its tool is missing")
    speech = _package(cache, "fake-speech")
    speech.mkdir(parents=True)
    for i in range(24):
        sf.write(str(speech / f"line{i:02d}.wav"), _noise(2.5 + 0.05 * i, 20 + i, cutoff=8000)[::2], 22050)
    midi_dir = root / "mid"
    midi_dir.mkdir()
    for i in range(10):
        (midi_dir / f"piece{i}.mid").write_bytes(midi_bytes(notes=tuple(55 + (i + 3 * k) % 20 for k in range(40))))
    return {"cache": cache, "midi_dir": midi_dir}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    soundfont = pretty_midi_soundfont()
    root = tmp_path_factory.mktemp("corpus")
    fx = _fixture(root)
    logs = []
    cfg = BuildConfig(out=root / "out", cache=fx["cache"], music_hours=1.0, midi_hours=60 / 3600,
                      speech_hours=45 / 3600, synthetic_speech_share=0.0, per_source_hours=1.0, min_seconds=20.0,
                      valid_fraction=0.2, midi_dir=fx["midi_dir"], soundfonts=(str(soundfont),), jobs=2,
                      install_tools=False, sources=SOURCES)
    path = build(cfg, log=logs.append)
    return {"root": root, "out": root / "out", "manifest": json.loads(path.read_text()), "log": "\n".join(logs),
            "cfg": cfg}


def test_manifest_schema_and_files(built):
    m, out = built["manifest"], built["out"]
    assert (m["format"], m["version"], m["sample_rate"], m["channels"]) == ("music2latent2-corpus", 1, SR, 1)
    assert m["config"]["min_seconds"] == 20.0 and m["build_seconds"] > 0
    assert m["files"] and all(set(e) == FILE_KEYS for e in m["files"])
    for e in m["files"]:
        info = sf.info(str(out / e["path"]))
        assert info.samplerate == SR and info.channels == 1 and info.format == "OGG"
        assert info.duration == pytest.approx(e["seconds"], abs=0.05)
        assert e["kind"] != "music" or e["seconds"] >= 20.0
        assert e["split"] in ("train", "valid") and e["path"].startswith("valid/") == (e["split"] == "valid")
    assert verify(out) == {"ok": len(m["files"]), "absent": 0}
    assert not out.with_name("out.partial").exists()
    hours = m["hours"]
    total = sum(e["seconds"] for e in m["files"]) / 3600
    for key in ("kind", "split", "source", "licence"):
        assert sum(hours[key].values()) == pytest.approx(total, abs=1e-3)


def test_rules_decide_what_goes_in(built):
    files, skipped = built["manifest"]["files"], built["manifest"]["skipped"]
    inputs = {name for e in files for name in e["inputs"]}
    assert {"second.flac", "third.flac"} <= inputs
    assert len(inputs & {"full.flac", "copy_of_full.flac"}) == 1  # identical files: one is kept
    assert not inputs & {"short.flac", "lowrate.flac", "muffled.flac", "tune.mod"}
    assert any("muffled" in s and "band-limited" in s for s in skipped)
    assert "no-such-renderer-m2l2 not installed" in built["log"]  # a missing tool skips its sources
    assert "warning: music has 0.0" in built["log"] and "of the 1.00 h asked for" in built["log"]  # fixture is small
    assert "warning: midi" not in built["log"]  # the MIDI renders reach their 60 s
    stems = [e for e in files if e["source"] == "fake-stems"]
    assert len(stems) == 1 and stems[0]["inputs"] == ["song.ogg", "drums.ogg"]
    assert stems[0]["seconds"] == pytest.approx(23.0, abs=0.3)  # stems mixed into one track
    music = [e for e in files if e["kind"] == "music"]
    assert all(e["bandwidth_hz"] >= 16000 and e["source_rate"] >= 32000 for e in music)
    assert {e["licence"] for e in music} == {"CC0-1.0", "CC-BY-SA-3.0"}


def test_speech_is_grouped_and_midi_rendered(built):
    files = built["manifest"]["files"]
    speech = [e for e in files if e["kind"] == "speech"]
    assert len(speech) == 2 and all(e["source_rate"] == 22050 and e["seconds"] >= 29 for e in speech)
    assert all(len(e["inputs"]) == 8 for e in speech)  # ~30 s of 2.5-3.7 s clips (the manifest lists 8)
    midi = [e for e in files if e["kind"] == "midi"]
    assert sum(e["seconds"] for e in midi) >= 60 and all(e["source"] == "music21" for e in midi)
    train = {n for e in midi if e["split"] == "train" for n in e["inputs"]}
    valid = {n for e in midi if e["split"] == "valid" for n in e["inputs"]}
    assert train and not train & valid  # held-out renders come from held-out scores


def test_validation_list_and_licences(built):
    out, files = built["out"], built["manifest"]["files"]
    listed = (out / "validation.txt").read_text().split()
    assert listed == sorted(e["path"] for e in files if e["split"] == "valid") and listed
    assert {e["source"] for e in files if e["split"] == "train"} >= {"fake-music", "fake-stems", "fake-speech"}
    assert (out / "licences" / "fake-music.txt").read_text() == "fake-music: free to use\n"
    assert built["manifest"]["hours"]["licence"]["CC0-1.0"] > 0


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "music2latent2.training.corpus", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_parts_round_trip_and_corruption(built, tmp_path):
    out = built["out"]
    res = _cli("pack", str(out), "--out", str(tmp_path / "carry"), "--part-mib", "0.5")
    assert res.returncode == 0, res.stderr
    parts = sorted((tmp_path / "carry").iterdir(), key=lambda p: int(p.name[1:]))
    assert len(parts) >= 3 and all((p / "part.tar").stat().st_size <= 0.5 * 2 ** 20 for p in parts)
    first = json.loads((parts[0] / "part.json").read_text())["files"]
    assert "manifest.json" in first  # part 1 carries the manifest: any prefix of parts can be verified
    res = _cli("unpack", str(parts[0]), "--into", str(tmp_path / "there"))
    assert res.returncode == 0, res.stderr
    res = _cli("verify", str(tmp_path / "there"), "--partial")
    assert res.returncode == 0 and " absent" in res.stdout, res.stderr
    assert _cli("verify", str(tmp_path / "there")).returncode == 1  # incomplete without --partial
    res = _cli("unpack", *map(str, parts[1:]), "--into", str(tmp_path / "there"))
    assert res.returncode == 0, res.stderr
    for f in out.rglob("*"):
        if f.is_file():
            assert (tmp_path / "there" / f.relative_to(out)).read_bytes() == f.read_bytes()
    assert verify(tmp_path / "there")["absent"] == 0

    tar = parts[1] / "part.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    res = _cli("unpack", str(parts[1]), "--into", str(tmp_path / "again"))
    assert res.returncode == 1 and "corrupt part" in res.stderr
    assert not (tmp_path / "again").exists()  # nothing extracted from a corrupt part

    victim = next((tmp_path / "there").rglob("*.ogg"))
    victim.write_bytes(victim.read_bytes()[:-10])
    res = _cli("verify", str(tmp_path / "there"))
    assert res.returncode == 1 and "corrupt" in res.stderr and victim.name in res.stderr


def test_pack_replaces_only_its_own_parts_and_marks_them_as_one_pack(built, tmp_path):
    carry = tmp_path / "carry"
    first = pack(built["out"], carry, part_mib=0.5, log=lambda s: None)
    packs = {json.loads((p / "part.json").read_text())["pack"] for p in first}
    assert len(packs) == 1 and len(next(iter(packs))) == 16
    second = pack(built["out"], carry, part_mib=0.5, log=lambda s: None)  # parts alone: replaced
    assert {json.loads((p / "part.json").read_text())["pack"] for p in second} != packs
    (carry / "compile_cache.bin.gz").write_bytes(b"kept")  # anything else of the user's: refused, untouched
    before = sorted(p.name for p in carry.iterdir())
    with pytest.raises(CorpusError, match="holds more than carry parts"):
        pack(built["out"], carry, part_mib=0.5, log=lambda s: None)
    assert sorted(p.name for p in carry.iterdir()) == before
    assert (carry / "compile_cache.bin.gz").read_bytes() == b"kept"


def test_a_file_larger_than_a_part_is_refused(built, tmp_path):
    with pytest.raises(CorpusError, match="larger than a part"):
        pack(built["out"], tmp_path / "carry", part_mib=0.05)
    assert not (tmp_path / "carry").exists()


def test_existing_corpus_is_kept_without_overwrite(built):
    out = built["out"]
    before = (out / "manifest.json").read_bytes()
    res = _cli("build", "--out", str(out), "--cache", str(built["cfg"].cache), "--no-install-tools")
    assert res.returncode == 1 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert (out / "manifest.json").read_bytes() == before


def test_overwrite_replaces_only_when_done(built, tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "old.txt").write_text("the previous corpus")
    cfg = BuildConfig(out=out, cache=built["cfg"].cache, music_hours=30 / 3600, midi_hours=0, speech_hours=0,
                      min_seconds=20.0, valid_fraction=0, jobs=1, install_tools=False, overwrite=True,
                      sources=SOURCES[:1])
    manifest = json.loads(build(cfg, log=lambda s: None).read_text())
    assert not (out / "old.txt").exists()
    assert len(manifest["files"]) + len(manifest["skipped"]) == 2  # water-filling passes 30 s by one track
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_unpack_refuses_what_is_not_a_part(tmp_path):
    (tmp_path / "p1").mkdir()
    with pytest.raises(CorpusError, match="not a corpus part"):
        unpack(tmp_path / "p1", tmp_path / "into")
    with pytest.raises(CorpusError, match="cannot read manifest.json"):
        verify(tmp_path)


def test_fetch_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CorpusError, match="apt-get not found"):
        fetch_packages(["some-package"], tmp_path / "cache", log=lambda s: None)


def test_corrupt_deb_is_named(tmp_path):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    (tmp_path / "cache" / "debs").mkdir(parents=True)
    (tmp_path / "cache" / "debs" / "broken_1.0_all.deb").write_bytes(b"!<arch>\ngarbage")
    with pytest.raises(CorpusError, match="cannot extract .*broken_1.0_all.deb"):
        fetch_packages(["broken"], tmp_path / "cache", log=lambda s: None)
    assert not (tmp_path / "cache" / "trees" / "broken").exists()


def test_unpack_refuses_a_part_that_escapes_the_corpus(tmp_path):
    import io
    import tarfile

    from music2latent2.training.corpus.audiofiles import file_digest

    part = tmp_path / "p1"
    part.mkdir()
    with tarfile.open(part / "part.tar", "w") as tar:
        payload = b"overwritten"
        member = tarfile.TarInfo("../outside.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    info = {"part": 1, "of": 1, "size": (part / "part.tar").stat().st_size,
            "sha256": file_digest(part / "part.tar"), "files": ["../outside.txt"]}
    (part / "part.json").write_text(json.dumps(info))
    with pytest.raises(CorpusError, match="unsafe member"):
        unpack(part, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "into").exists()


def test_a_rebuild_gives_the_same_audio(built, tmp_path):
    manifests = []
    for name in ("a", "b"):
        cfg = BuildConfig(out=tmp_path / name, cache=built["cfg"].cache, music_hours=60 / 3600, midi_hours=0,
                          speech_hours=45 / 3600, synthetic_speech_share=0.0, min_seconds=20.0, valid_fraction=0,
                          jobs=2, install_tools=False, sources=SOURCES)
        manifests.append(json.loads(build(cfg, log=lambda s: None).read_text())["files"])
    assert [e["path"] for e in manifests[0]] == [e["path"] for e in manifests[1]] and manifests[0]
    for e in manifests[0]:
        # Same samples; the files' bytes (and sha256) differ only by the Ogg stream's random serial number.
        assert np.array_equal(sf.read(str(tmp_path / "a" / e["path"]))[0], sf.read(str(tmp_path / "b" / e["path"]))[0])


def test_a_build_that_makes_nothing_says_why(built, tmp_path):
    cfg = BuildConfig(out=tmp_path / "corpus", cache=built["cfg"].cache, music_hours=1.0, midi_hours=0,
                      speech_hours=0, min_seconds=600.0, jobs=1, install_tools=False, sources=SOURCES[:1])
    with pytest.raises(CorpusError, match="no track could be made"):
        build(cfg, log=lambda s: None)
    assert os.listdir(tmp_path) == []  # neither a corpus nor its .partial folder is left
