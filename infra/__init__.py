"""Deployment pieces and the embedded local stack (real Redis + real S3 as child processes)."""
