"""Short-lived realtime (voice) client secrets, minted from server-side presets."""
