"""SDP for WebRTC voice calls: checking a browser's offer, and answering it in simulated mode.

`POST /v1/realtime/calls` forwards the caller's offer upstream; `check_offer` refuses first,
with a 400 naming `sdp`, what could never set up a call, so the upstream is not asked (and
billed) for it. Its checks are ones every real offer passes (Chrome, Firefox, Safari, aiortc).

Offline (no OPENAI_API_KEY) the gateway answers the call itself: `simulated_answer` is a real
answer to the offer (the same m= sections in the same order, opus for audio, the data channel,
fresh ICE credentials and a DTLS fingerprint, RFC 8829 section 5.3) that a WebRTC stack applies
with `setRemoteDescription`. It names no ICE candidates, so media never flows; the call is set
up and the simulated sideband meters it.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass, field

from app.errors import InvalidRequest

MAX_SDP_BYTES = 64 * 1024  # a browser's offer is 2-6 KiB; a few simulcast video sections stay well below

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # C0, DEL and C1 but tab (lines hold no CR or LF)
# m=<media> <port>[/<count>] <proto> <format> ...
_MEDIA_LINE = re.compile(r"m=(\S+) (\d+)(?:/\d+)? (\S+)((?: \S+)+)")
_ICE_CHARS = string.ascii_letters + string.digits  # ice-char is ALPHA / DIGIT / "+" / "/" (RFC 8839)
_ANSWERED_DIRECTION = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


@dataclass
class _Section:
    """One m= section: its m= line's fields and its attribute values (`a=name:value` or `a=flag`)."""

    media: str
    port: int
    proto: str
    formats: list[str]
    attributes: list[tuple[str, str]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.attributes if key == name]

    def first(self, name: str) -> str | None:
        return next(iter(self.values(name)), None)

    def has(self, name: str) -> bool:
        return any(key == name for key, _ in self.attributes)


@dataclass
class _Description:
    session: list[tuple[str, str]]
    sections: list[_Section]

    def bundles(self) -> list[list[str]]:
        """The mids of each `a=group:BUNDLE` line, in order."""
        return [value.split()[1:] for key, value in self.session if key == "group" and value.startswith("BUNDLE")]


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="sdp")


def _parse(sdp: str) -> _Description:
    """The offer's session attributes and m= sections; refuses what `check_offer` documents."""
    if not sdp.strip():
        raise _refuse("The SDP offer is empty.")
    size = len(sdp.encode("utf-8", "surrogatepass"))
    if size > MAX_SDP_BYTES:
        raise _refuse(f"The SDP offer is {size} bytes; at most {MAX_SDP_BYTES} are accepted.")
    lines = _LINE_BREAK.split(sdp)
    for number, line in enumerate(lines, 1):
        bad = _CONTROL.search(line)
        if bad is not None:
            raise _refuse(
                f"The SDP offer has a control character (U+{ord(bad.group()):04X}) on line {number}; "
                "only CR, LF and tab may appear."
            )
    if lines[0].rstrip() != "v=0":
        raise _refuse("The SDP offer must start with the line `v=0`.")
    description = _Description([], [])
    for number, line in enumerate(lines, 1):
        if line.startswith("m="):
            match = _MEDIA_LINE.fullmatch(line.rstrip())
            if match is None:
                raise _refuse(f"Line {number} of the SDP offer is not `m=<media> <port> <proto> <format>...`.")
            media, port, proto, formats = match.groups()
            description.sections.append(_Section(media, int(port), proto, formats.split()))
        elif line.startswith("a="):
            name, _, value = line[2:].rstrip().partition(":")
            attributes = description.sections[-1].attributes if description.sections else description.session
            attributes.append((name, value))
    if not description.sections:
        raise _refuse("The SDP offer has no media section (`m=` line); a call offers audio and a data channel.")
    if description.bundles():
        for number, section in enumerate(description.sections, 1):
            if section.first("mid") is None:
                raise _refuse(
                    f"The SDP offer bundles its media (`a=group:BUNDLE`) but its m= section {number} "
                    f"({section.media}) has no `a=mid:`."
                )
    mids = {section.first("mid") for section in description.sections}
    unknown = next((mid for group in description.bundles() for mid in group if mid not in mids), None)
    if unknown is not None:
        raise _refuse(f"The SDP offer's `a=group:BUNDLE` names mid {unknown!r}, which no m= section has.")
    return description


def check_offer(sdp: str) -> None:
    """Refuse (400 `invalid_request`, `param: "sdp"`) an offer that is not SDP a call can be set up from:
    empty, over `MAX_SDP_BYTES`, with control characters (but CR, LF and tab), not starting with `v=0`,
    with no or a malformed `m=` line, or bundling sections that lack `a=mid:`."""
    _parse(sdp)


def simulated_answer(offer: str) -> str:
    """An SDP answer to `offer` (refused as by `check_offer`), as an answering WebRTC endpoint makes it.

    Each of the offer's m= sections is answered in order: audio with the offer's opus (its rtpmap and
    fmtp), the data channel with the offer's SCTP port and message size; anything else (video, audio
    without opus, a section the offer rejected) is rejected with port 0. Accepted sections share a
    transport per BUNDLE group: fresh ICE credentials, a fresh sha-256 fingerprint, `a=setup:active`.
    """
    description = _parse(offer)
    bundles = [group for group in description.bundles() if group]
    session_setup = next((value for key, value in description.session if key == "setup"), None)
    transports: dict[tuple[str, int], list[str]] = {}
    accepted: set[str] = set()
    sections: list[list[str]] = []
    for index, section in enumerate(description.sections):
        mid = section.first("mid")
        bundle = next((number for number, group in enumerate(bundles) if mid in group), None)
        body = _answer_media(section)
        if body is None:
            sections.append(_rejected(section))
            continue
        if mid is not None:
            accepted.add(mid)
        # One transport per BUNDLE group, else one per section.
        key = ("bundle", bundle) if bundle is not None else ("section", index)
        if key not in transports:
            transports[key] = _transport()
        # The offer says actpass (browsers): we take the DTLS client's part, as answering browsers do.
        setup = "passive" if (section.first("setup") or session_setup) == "active" else "active"
        head, tail = body
        sections.append(
            [
                head,
                "c=IN IP4 0.0.0.0",
                *transports[key],
                f"a=setup:{setup}",
                *([f"a=mid:{mid}"] if mid is not None else []),
                *tail,
            ]
        )
    lines = ["v=0", f"o=- {secrets.randbelow(2**62) + 1} 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    for group in bundles:
        answered = [mid for mid in group if mid in accepted]
        if answered:
            lines.append("a=group:BUNDLE " + " ".join(answered))
    lines.append("a=msid-semantic:WMS *")
    for section_lines in sections:
        lines.extend(section_lines)
    return "\r\n".join(lines) + "\r\n"


def _answer_media(section: _Section) -> tuple[str, list[str]] | None:
    """The m= line and the media attributes answering `section`, or None to reject it."""
    bundle_only = section.has("bundle-only")  # Firefox's max-bundle: port 0 but not rejected
    if section.port == 0 and not bundle_only:
        return None
    if section.media == "audio":
        return _answer_audio(section)
    if section.media == "application" and section.proto.endswith("DTLS/SCTP"):
        return _answer_data_channel(section)
    return None


def _answer_audio(section: _Section) -> tuple[str, list[str]] | None:
    rtpmaps = {}
    for value in section.values("rtpmap"):
        payload_type, _, encoding = value.partition(" ")
        rtpmaps[payload_type] = encoding
    opus = next((pt for pt in section.formats if rtpmaps.get(pt, "").lower().startswith("opus/")), None)
    if opus is None:
        return None
    offered = next((name for name in _ANSWERED_DIRECTION if section.has(name)), "sendrecv")
    direction = _ANSWERED_DIRECTION[offered]
    fmtp = next((value for value in section.values("fmtp") if value.split(" ", 1)[0] == opus), None)
    tail = [f"a={direction}"]
    if direction in ("sendrecv", "sendonly"):
        # The track we would send; `msid` gives the browser a stream for it (`event.streams[0]`).
        tail.append(f"a=msid:{secrets.token_hex(8)} {secrets.token_hex(8)}")
    tail += ["a=rtcp-mux", f"a=rtpmap:{opus} {rtpmaps[opus]}", *([f"a=fmtp:{fmtp}"] if fmtp else [])]
    return f"m=audio 9 {section.proto} {opus}", tail


def _answer_data_channel(section: _Section) -> tuple[str, list[str]]:
    tail = []
    if section.proto == "DTLS/SCTP":  # the legacy form: the SCTP port is the format, with `a=sctpmap`
        tail += [f"a=sctpmap:{value}" for value in section.values("sctpmap")[:1]]
    else:
        tail += [f"a=sctp-port:{section.first('sctp-port') or '5000'}"]
    tail += [f"a=max-message-size:{value}" for value in section.values("max-message-size")[:1]]
    return f"m=application 9 {section.proto} {' '.join(section.formats)}", tail


def _rejected(section: _Section) -> list[str]:
    """A rejected section: port 0, the offer's media, proto and first format, and its mid."""
    mid = section.first("mid")
    return [
        f"m={section.media} 0 {section.proto} {section.formats[0]}",
        "c=IN IP4 0.0.0.0",
        "a=inactive",
        *([f"a=mid:{mid}"] if mid is not None else []),
    ]


def _transport() -> list[str]:
    """Fresh ICE credentials (a 16-character ufrag, a 32-character password: RFC 8839 asks for at least 4
    and 22) and the sha-256 fingerprint of a certificate that does not exist: 32 random bytes."""
    ufrag = "".join(secrets.choice(_ICE_CHARS) for _ in range(16))
    password = "".join(secrets.choice(_ICE_CHARS) for _ in range(32))
    fingerprint = ":".join(f"{byte:02X}" for byte in secrets.token_bytes(32))
    return [f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{password}", f"a=fingerprint:sha-256 {fingerprint}"]
