"""The producer side: submit batches, watch them, fetch results. Never imports torch or worker/."""

from .submit import SubmitResult, submit_plan

__all__ = ["SubmitResult", "submit_plan"]
