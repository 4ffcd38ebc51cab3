"""The gateway role: live feeds per site, replays, and the transports viewers use."""
