"""Errors the routes turn into `{"error": ..., "details": [...]}` responses."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.message}
        if self.details:
            body["details"] = self.details
        return body


class NotFound(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(404, message)


class Conflict(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(409, message)


class Unavailable(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, message)


def job_not_found(job_id: str) -> NotFound:
    return NotFound(f"job {job_id!r} not found")
