"""The catalogue: which Debian packages feed the corpus, how each is turned into audio, and its licence.

Every package is in Debian main, so its contents are DFSG-free (GPL, CC-BY, CC-BY-SA, CC0,
public domain, BSD-like; nothing non-commercial). Share-alike licences bind redistribution of
the audio, not a model trained on it; the model card says so. The licence strings summarise
each package's ``copyright`` file, which the builder also copies into ``OUT/licences/``.

Hours are the measured music in files of at least 30 s, after de-duplication (Debian bookworm,
2026-11); packages whose music is band-limited below ~16 kHz or sampled below 32 kHz as a whole
(flare-game, asc-music, openarena, planetblupi) are left out, and per-file checks catch the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

Kind = Literal["music", "midi", "speech", "real"]
# How a package's files become tracks: decoded audio files, Frets on Fire stems (mixed),
# tracker modules (openmpt123), LMMS projects (lmms), short speech clips (joined to ~30 s).
Handler = Literal["files", "stems", "tracker", "lmms", "speech_clips"]


class CorpusError(RuntimeError):
    """A corpus cannot be built, packed or verified; the message names the cause and the fix."""


@dataclass(frozen=True)
class Source:
    """One Debian package the corpus draws from.

    Args:
        package: Debian package name (``apt-get download`` fetches it).
        kind: what its tracks are in the manifest.
        handler: how its files become tracks (see ``Handler``).
        licence: summary of the package's copyright file.
        hours: measured hours it can give (before caps), for planning and the README.
        style: a few words on what it sounds like.
        tool: the program the handler needs (``openmpt123``, ``lmms``), if any.
    """

    package: str
    kind: Kind
    handler: Handler
    licence: str
    hours: float
    style: str = ""
    tool: Optional[str] = None


MUSIC_SOURCES: Tuple[Source, ...] = (
    Source("marsshooter-data", "music", "files", "CC-BY-SA-3.0", 0.98,
           "Obsidian Shell: a band, metal with female vocals; electronic"),
    Source("fretsonfire-songs-muldjord", "music", "stems", "CC-BY-SA-3.0", 0.22, "death metal with vocals (stems)"),
    Source("fretsonfire-songs-sectoid", "music", "stems", "GPL", 0.23, "metal / rock (stems)"),
    Source("lmms-common", "music", "lmms", "GPL-2+ / CC-BY-SA (demo projects)", 1.09,
           "EDM, house, reggae, synth-pop (rendered)", tool="lmms"),
    Source("nexuiz-music", "music", "files", "GPL-2+", 1.40, "electronic / industrial / techno"),
    Source("supertux-data", "music", "files", "GPL-2+ / GPL-3+ / CC-BY-SA / CC0 (mixed)", 1.62,
           "game pop, chiptune, orchestral"),
    Source("hedgewars-data", "music", "files", "GPL-2 / CC-BY-SA-3.0", 1.56, "varied themes"),
    Source("colobot-common-sounds", "music", "files", "GPL-3+", 1.09, "electronic / rock"),
    Source("singularity-music", "music", "files", "CC-BY-SA-3.0", 1.07, "ambient electronic"),
    Source("warzone2100-music", "music", "files", "GPL-2+ / CC-BY-SA-3.0 / CC0", 4.05, "electronic / ambient"),
    Source("ufoai-music", "music", "files", "GPL-2+ / CC-BY(-SA)-3.0 / PD", 4.00,
           "electronic / ambient / orchestral (some tracks band-limited: dropped per file)"),
    Source("naev-data", "music", "files", "GPL / CC-BY(-SA)-3.0 / PD (mixed)", 2.11, "electronic / orchestral"),
    Source("wesnoth-1.16-music", "music", "files", "GPL-2+", 2.11, "orchestral"),
    Source("drascula-music", "music", "files", "Drascula licence (BSD-like)", 0.77, "adventure-game score"),
    Source("trackballs-data", "music", "files", "GPL-2+ / Ethymonics free music licence", 0.53, "electronic"),
    Source("pushover-data", "music", "files", "GPL-2+ / GPL-3+", 0.52, "game pop"),
    Source("starfighter-data", "music", "files", "CC-BY-3.0 / CC-BY-SA-3.0 / PD", 0.47, "electronic / rock"),
    Source("davegnukem-data", "music", "files", "CC-BY-3.0", 0.39, "game music (Eric Matyas)"),
    Source("hyperrogue-music", "music", "files", "CC-BY-SA-3.0 / CC-BY-3.0", 0.34, "ambient / orchestral"),
    Source("enigma-data", "music", "files", "GPL-2+", 0.32, "ambient"),
    Source("ardentryst", "music", "files", "CC-BY-SA-3.0 / GPL-3+", 0.27, "fantasy score"),
    Source("warmux-data", "music", "files", "GPL-2+", 0.46, "game pop"),
    Source("xmoto-data", "music", "files", "GPL-2+", 0.19, "rock / electronic"),
    # Tracker modules: 90s sampled-instrument mixes, rendered offline.
    Source("ironseed-data", "music", "tracker", "GPL-3+", 1.06, "tracker modules", tool="openmpt123"),
    Source("tecnoballz-data", "music", "tracker", "GPL-3+", 0.92, "tracker modules", tool="openmpt123"),
    Source("pekka-kana-2-data", "music", "tracker", "BSD-2-Clause", 0.49, "tracker modules", tool="openmpt123"),
    Source("heroes-sound-tracks", "music", "tracker", "GPL-2+", 0.48, "tracker modules", tool="openmpt123"),
    Source("pingus-data", "music", "tracker", "GPL-2+", 0.38, "tracker modules", tool="openmpt123"),
    Source("biniax2-data", "music", "tracker", "Zlib", 0.33, "tracker modules", tool="openmpt123"),
    Source("gl-117-data", "music", "tracker", "GPL-2", 0.14, "tracker modules", tool="openmpt123"),
    Source("tomatoes-data", "music", "tracker", "GPL-2+ / Zlib", 0.11, "tracker modules", tool="openmpt123"),
)

# Real speech. No full-band read speech exists in any offline registry: these are actors'
# lines at 22.05 kHz, accepted for speech only (the music rules need >= 32 kHz).
SPEECH_SOURCES: Tuple[Source, ...] = (
    Source("fillets-ng-data-cs", "speech", "speech_clips", "GPL-2+", 1.76, "Czech actors"),
    Source("fillets-ng-data-nl", "speech", "speech_clips", "GPL-2+", 1.60, "Dutch actors"),
)


@dataclass(frozen=True)
class SoundFont:
    """A General MIDI soundfont (sf2: midirenderer reads no sf3) and the package that ships it."""

    package: str
    path: str  # inside the extracted package
    licence: str


SOUNDFONTS: Tuple[SoundFont, ...] = (
    SoundFont("fluid-soundfont-gm", "usr/share/sounds/sf2/FluidR3_GM.sf2", "MIT"),
    SoundFont("timgm6mb-soundfont", "usr/share/sounds/sf2/TimGM6mb.sf2", "GPL-2"),
    SoundFont("csound-soundfont", "usr/share/sounds/sf2/sf_GMbank.sf2", "LGPL-2.1+"),
)

# Tools the handlers run, and the Debian package that provides each.
TOOL_PACKAGES: Dict[str, str] = {"openmpt123": "openmpt123", "lmms": "lmms", "espeak-ng": "espeak-ng"}

# Licences of known sub-folders (one per source) of a recordings folder passed with --real.
REAL_LICENCES: Dict[str, str] = {"weresax": "CC0-1.0", "splendid_grand_piano": "public domain",
                                 "sonic_pi": "CC0-1.0", "sms_tools_sounds": "CC-BY-4.0"}
