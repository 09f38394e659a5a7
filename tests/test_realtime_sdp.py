"""WebRTC call SDP (app/realtime/sdp.py) and the development example page (app/realtime/example.py).

Offers are literal Chrome and Firefox offers (audio + the `oai-events` data channel) and
aiortc's own; the simulated answer is checked line by line against the offer, and applied
to a real WebRTC stack (aiortc's RTCPeerConnection), which must accept it.
"""

from __future__ import annotations

import re
import secrets

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from app.errors import InvalidRequest
from app.realtime.sdp import MAX_SDP_BYTES, check_offer, simulated_answer
from support.errors import assert_error
from support.gateway import Gateway, GatewayFactory
from support.sdp import CHROME_OFFER, FIREFOX_OFFER, crlf

BROWSER_OFFERS = {"chrome": (CHROME_OFFER, "111", "262144"), "firefox": (FIREFOX_OFFER, "109", "1073741823")}
FINGERPRINT = re.compile(r"sha-256 [0-9A-F]{2}(?::[0-9A-F]{2}){31}")
ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")


def sections(sdp: str) -> tuple[list[str], list[list[str]]]:
    """The session lines and each m= section's lines (its m= line first)."""
    session: list[str] = []
    media: list[list[str]] = []
    for line in sdp.split("\r\n")[:-1]:
        if line.startswith("m="):
            media.append([line])
        else:
            (media[-1] if media else session).append(line)
    return session, media


def attribute(lines: list[str], name: str) -> list[str]:
    return [line.split(":", 1)[1] for line in lines if line.startswith(f"a={name}:")]


def refusal(sdp: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        check_offer(sdp)
    error = caught.value
    assert (error.status_code, error.param, error.body()["error"]["code"]) == (400, "sdp", "invalid_request")
    return error.message


# --- check_offer -------------------------------------------------------------------------


@pytest.mark.parametrize("offer", [CHROME_OFFER, FIREFOX_OFFER, CHROME_OFFER.replace("\r\n", "\n")])
def test_real_offers_pass(offer: str) -> None:
    check_offer(offer)


@pytest.mark.parametrize(
    ("sdp", "message"),
    [
        ("", "The SDP offer is empty."),
        (" \r\n\r\n", "The SDP offer is empty."),
        (CHROME_OFFER + "a=x:" + "y" * MAX_SDP_BYTES + "\r\n", f"at most {MAX_SDP_BYTES} are accepted"),
        (CHROME_OFFER.replace("s=-", "s=\x00"), "control character (U+0000) on line 3"),
        (CHROME_OFFER.replace("s=-", "s=\x1b[0m"), "control character (U+001B) on line 3"),
        (CHROME_OFFER.replace("s=-", "s=\x85"), "control character (U+0085) on line 3"),
        (CHROME_OFFER.replace("v=0\r\n", "", 1), "must start with the line `v=0`"),
        ("\r\n" + CHROME_OFFER, "must start with the line `v=0`"),
        (CHROME_OFFER.replace("v=0", "v=1", 1), "must start with the line `v=0`"),
        ("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "has no media section (`m=` line)"),
        (CHROME_OFFER.replace("m=audio 9 UDP/TLS/RTP/SAVPF 111 63", "m=audio nine UDP"), "Line 8 of the SDP"),
        (CHROME_OFFER.replace("a=mid:1\r\n", ""), "m= section 2 (application) has no `a=mid:`"),
        (CHROME_OFFER.replace("BUNDLE 0 1", "BUNDLE 0 1 2"), "names mid '2', which no m= section has"),
    ],
    ids=[
        "empty",
        "blank",
        "too-long",
        "nul",
        "escape",
        "c1-control",
        "no-version",
        "leading-blank-line",
        "wrong-version",
        "no-media",
        "bad-m-line",
        "bundle-without-mid",
        "bundle-unknown-mid",
    ],
)
def test_bad_offers_are_refused_naming_what_is_wrong(sdp: str, message: str) -> None:
    assert message in refusal(sdp)


def test_tabs_and_unbundled_sections_without_mid_pass() -> None:
    unbundled = CHROME_OFFER.replace("a=group:BUNDLE 0 1\r\n", "").replace("a=mid:1\r\n", "")
    check_offer(unbundled.replace("s=-", "s=a\tb"))


# --- simulated_answer against the offer --------------------------------------------------


@pytest.mark.parametrize("browser", sorted(BROWSER_OFFERS))
def test_the_answer_mirrors_a_browser_offer(browser: str) -> None:
    offer, opus, max_message_size = BROWSER_OFFERS[browser]
    answer = simulated_answer(offer)
    assert answer.endswith("\r\n") and "\n" not in answer.replace("\r\n", "") and "\r" not in answer.replace("\r\n", "")
    check_offer(answer)  # well-formed SDP by the same rules
    session, (audio, data) = sections(answer)
    assert session[:4] == ["v=0", session[1], "s=-", "t=0 0"] and re.fullmatch(
        r"o=- \d+ 2 IN IP4 127\.0\.0\.1", session[1]
    )
    assert "a=group:BUNDLE 0 1" in session

    offered_audio = sections(offer)[1][0]
    assert audio[0] == f"m=audio 9 UDP/TLS/RTP/SAVPF {opus}"
    assert attribute(audio, "rtpmap") == [f"{opus} opus/48000/2"]
    assert attribute(audio, "fmtp") == [
        value for value in attribute(offered_audio, "fmtp") if value.startswith(opus + " ")
    ]
    assert {"c=IN IP4 0.0.0.0", "a=mid:0", "a=sendrecv", "a=rtcp-mux", "a=setup:active"} <= set(audio)

    assert data[0] == "m=application 9 UDP/DTLS/SCTP webrtc-datachannel"
    assert {"c=IN IP4 0.0.0.0", "a=mid:1", "a=sctp-port:5000", f"a=max-message-size:{max_message_size}"} <= set(data)
    assert "a=setup:active" in data

    # One bundled transport: the same fresh credentials and fingerprint in both sections.
    for name in ("ice-ufrag", "ice-pwd", "fingerprint"):
        [value] = attribute(audio, name)
        assert attribute(data, name) == [value]
        assert value not in offer
    [ufrag], [password], [fingerprint] = (attribute(audio, name) for name in ("ice-ufrag", "ice-pwd", "fingerprint"))
    assert ICE_CHARS.fullmatch(ufrag) and 4 <= len(ufrag) <= 256
    assert ICE_CHARS.fullmatch(password) and 22 <= len(password) <= 256
    assert FINGERPRINT.fullmatch(fingerprint)
    assert not any(line.startswith("a=candidate") for line in answer.split("\r\n"))


def test_each_answer_has_fresh_credentials() -> None:
    first, second = (attribute(sections(simulated_answer(CHROME_OFFER))[1][0], "ice-pwd") for _ in range(2))
    assert first != second


@pytest.mark.parametrize(
    ("offered", "answered"),
    [("sendrecv", "sendrecv"), ("sendonly", "recvonly"), ("recvonly", "sendonly"), ("inactive", "inactive")],
)
def test_the_direction_is_answered(offered: str, answered: str) -> None:
    audio = sections(simulated_answer(CHROME_OFFER.replace("a=sendrecv", f"a={offered}")))[1][0]
    assert [line for line in audio if line[2:] in {"sendrecv", "sendonly", "recvonly", "inactive"}] == [f"a={answered}"]
    assert bool(attribute(audio, "msid")) == (answered in {"sendrecv", "sendonly"})  # a track only when we send


def test_what_the_call_cannot_use_is_rejected_and_left_out_of_the_bundle() -> None:
    video = crlf("""
m=video 9 UDP/TLS/RTP/SAVPF 96
c=IN IP4 0.0.0.0
a=mid:2
a=sendrecv
a=rtcp-mux
a=rtpmap:96 VP8/90000
""")
    offer = CHROME_OFFER.replace("BUNDLE 0 1", "BUNDLE 0 1 2") + video
    session, (audio, data, rejected) = sections(simulated_answer(offer))
    assert "a=group:BUNDLE 0 1" in session
    assert rejected[0] == "m=video 0 UDP/TLS/RTP/SAVPF 96" and "a=mid:2" in rejected
    assert audio[0].startswith("m=audio 9 ") and data[0].startswith("m=application 9 ")

    no_opus = CHROME_OFFER.replace("a=rtpmap:111 opus/48000/2", "a=rtpmap:111 x-other/48000/2")
    session, (audio, data) = sections(simulated_answer(no_opus))
    assert audio[0].startswith("m=audio 0 ") and "a=group:BUNDLE 1" in session


def test_firefox_max_bundle_sections_are_not_rejected() -> None:
    # bundlePolicy "max-bundle": Firefox offers the second section with port 0 and a=bundle-only.
    offer = FIREFOX_OFFER.replace("m=application 9", "m=application 0").replace(
        "a=mid:1\r\n", "a=mid:1\r\na=bundle-only\r\n"
    )
    _, (_, data) = sections(simulated_answer(offer))
    assert data[0] == "m=application 9 UDP/DTLS/SCTP webrtc-datachannel"


def test_a_legacy_data_channel_offer_is_answered_in_its_form() -> None:
    legacy = CHROME_OFFER.replace("UDP/DTLS/SCTP webrtc-datachannel", "DTLS/SCTP 5000").replace(
        "a=sctp-port:5000", "a=sctpmap:5000 webrtc-datachannel 1024"
    )
    _, (_, data) = sections(simulated_answer(legacy))
    assert data[0] == "m=application 9 DTLS/SCTP 5000" and "a=sctpmap:5000 webrtc-datachannel 1024" in data


def test_an_unbundled_offer_gets_a_transport_per_section() -> None:
    session, (audio, data) = sections(simulated_answer(CHROME_OFFER.replace("a=group:BUNDLE 0 1\r\n", "")))
    assert not any(line.startswith("a=group") for line in session)
    assert attribute(audio, "ice-ufrag") != attribute(data, "ice-ufrag")


# --- simulated_answer applied by a real WebRTC stack (aiortc) ----------------------------


@pytest.mark.parametrize("direction", ["sendrecv", "sendonly", "recvonly"])
async def test_aiortc_accepts_the_answer(direction: str) -> None:
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("audio", direction=direction)
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        check_offer(offer)
        await pc.setRemoteDescription(RTCSessionDescription(simulated_answer(offer), "answer"))
        assert pc.signalingState == "stable"
        assert transceiver.currentDirection == direction  # the answer's direction, as aiortc reads it
        assert pc.remoteDescription.sdp.count("m=") == 2
    finally:
        await pc.close()


# --- the example page --------------------------------------------------------------------


async def test_the_example_page_is_served_in_development(gateway_with: GatewayFactory) -> None:
    async with gateway_with(simulated=True, environment="development") as gateway:
        response = await gateway.client.get("/dev/realtime")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for needle in ("/v1/realtime/calls", "setRemoteDescription", "application/sdp", '"oai-events"', "/hangup"):
        assert needle in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing from elsewhere: works offline


async def test_the_example_page_is_a_404_in_test(gateway: Gateway) -> None:
    assert_error(await gateway.client.get("/dev/realtime"), 404)


async def test_the_example_page_is_a_404_in_production(gateway_with: GatewayFactory) -> None:
    strong = {name: secrets.token_urlsafe(32) for name in ("admin_api_key", "jwt_secret", "image_url_secret")}
    async with gateway_with(environment="production", image_public_base_url="http://127.0.0.1", **strong) as gateway:
        assert_error(await gateway.client.get("/dev/realtime"), 404)
