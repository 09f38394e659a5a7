"""Browser SDP offers, as tests send them to the gateway and the fake upstream."""

from __future__ import annotations


def crlf(text: str) -> str:
    """An offer as browsers send it: one line per SDP line, CRLF-terminated."""
    return "".join(line.strip() + "\r\n" for line in text.strip().splitlines())


# Chrome 131 on macOS: getUserMedia audio + createDataChannel("oai-events"), as `offer.sdp`.
CHROME_OFFER = crlf("""
v=0
o=- 7196374352316435372 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=msid-semantic: WMS 3c0f3b42-7d1c-4b4e-9a0e-6c8a4d7d1f55
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:Vx3e
a=ice-pwd:mO0lSx0bq4C8dVNBkkPGNMsV
a=ice-options:trickle
a=fingerprint:sha-256 D5:32:CB:62:18:D9:9B:F8:E4:4E:B9:EA:8A:9B:11:E3:F8:5F:19:29:6D:FF:44:30:B1:DD:E4:E0:40:1A:FC:F4
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=sendrecv
a=msid:3c0f3b42-7d1c-4b4e-9a0e-6c8a4d7d1f55 8e5c4f2a-1b7d-4e0a-9c3f-2d6b8a1e4f70
a=rtcp-mux
a=rtcp-rsize
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:13 CN/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
a=ssrc:2741358172 cname:q3Yb0Ukx3bA1H0yN
a=ssrc:2741358172 msid:3c0f3b42-7d1c-4b4e-9a0e-6c8a4d7d1f55 8e5c4f2a-1b7d-4e0a-9c3f-2d6b8a1e4f70
m=application 9 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 0.0.0.0
a=ice-ufrag:Vx3e
a=ice-pwd:mO0lSx0bq4C8dVNBkkPGNMsV
a=ice-options:trickle
a=fingerprint:sha-256 D5:32:CB:62:18:D9:9B:F8:E4:4E:B9:EA:8A:9B:11:E3:F8:5F:19:29:6D:FF:44:30:B1:DD:E4:E0:40:1A:FC:F4
a=setup:actpass
a=mid:1
a=sctp-port:5000
a=max-message-size:262144
""")

# Firefox 133: the fingerprint at session level, fmtp before rtpmap, its own max-message-size.
FIREFOX_OFFER = crlf("""
v=0
o=mozilla...THIS_IS_SDPARTA-99.0 6385128416213475853 0 IN IP4 0.0.0.0
s=-
t=0 0
a=fingerprint:sha-256 BE:E0:8F:AF:0D:9E:83:CC:02:2C:C7:5E:6F:DC:A6:41:C1:A4:11:82:CE:60:4F:18:3C:DE:C5:2D:47:93:F9:05
a=group:BUNDLE 0 1
a=ice-options:trickle
a=msid-semantic:WMS *
m=audio 9 UDP/TLS/RTP/SAVPF 109 9 0 8 101
c=IN IP4 0.0.0.0
a=sendrecv
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2/recvonly urn:ietf:params:rtp-hdrext:csrc-audio-level
a=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid
a=fmtp:109 maxplaybackrate=48000;stereo=1;useinbandfec=1
a=fmtp:101 0-15
a=ice-pwd:7a5d2e0c58e1f3b9d6a4c2e8f0b1d3a5
a=ice-ufrag:4f2b9c1e
a=mid:0
a=msid:{5b8d3c2a-6e1f-4a7b-9c0d-2e3f4a5b6c7d} {1a2b3c4d-5e6f-4789-abcd-ef0123456789}
a=rtcp-mux
a=rtpmap:109 opus/48000/2
a=rtpmap:9 G722/8000/1
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=setup:actpass
a=ssrc:1693467135 cname:{8a9b0c1d-2e3f-4a5b-8c7d-9e0f1a2b3c4d}
m=application 9 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 0.0.0.0
a=sendrecv
a=ice-pwd:7a5d2e0c58e1f3b9d6a4c2e8f0b1d3a5
a=ice-ufrag:4f2b9c1e
a=mid:1
a=setup:actpass
a=sctp-port:5000
a=max-message-size:1073741823
""")
