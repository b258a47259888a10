"""What every reply-text backend shares: its config (`ResponderConfig`), the turns it reads (`ChatTurn`) and
the error it raises (`ResponderError`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatTurn", "ResponderConfig", "ResponderError"]


class ResponderError(Exception):
    """A reply that could not be written. Picklable, so it crosses Ray Serve handles intact.

    `code` says what kind of failure: `timeout`, `unavailable` (cannot connect), `upstream_error` (the
    server answered with an error or garbage), `bad_request` (nothing to reply to), or the AWS error code
    for Bedrock (`ValidationException`, `ThrottlingException`, ...). `status` is the HTTP status if any.
    """

    def __init__(self, message: str, code: str = "upstream_error", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __reduce__(self) -> tuple[type[ResponderError], tuple[str, str, int | None]]:
        return (type(self), (self.message, self.code, self.status))


class ChatTurn(BaseModel):
    """One turn of the conversation as text (what the person said, or what the assistant said)."""

    model_config = ConfigDict(frozen=True)

    role: Literal["user", "assistant"]
    text: str


class ResponderConfig(BaseModel):
    """Which backend writes replies, and its knobs (constructor args, overridden by `user_config`)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["echo", "openai", "bedrock"] = "echo"
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = Field("gpt-4o-mini", min_length=1)
    openai_api_key_env: str = "OPENAI_API_KEY"  # name of the variable; no key is fine for local servers
    bedrock_model_id: str = Field("anthropic.claude-3-haiku-20240307-v1:0", min_length=1)
    bedrock_region: str = Field("us-east-1", min_length=1)
    bedrock_endpoint_url: str | None = None
    max_tokens: int = Field(200, gt=0)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    timeout_s: float = Field(20.0, gt=0)  # whole reply
    connect_timeout_s: float = Field(5.0, gt=0)

    @field_validator("openai_base_url", "bedrock_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value
