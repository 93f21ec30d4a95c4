"""The GPU side: loads one diffusers pipeline per process and renders chunks. torch lives here."""
