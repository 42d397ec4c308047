"""``reward.http``: an external reward service (a reward model, a judge) behind one POST endpoint.

Request body: ``{"samples": [{"prompt": ..., "completion": ..., "row": {...}}, ...]}``.
Expected reply: ``{"rewards": [float, ...]}`` with one reward per sample, in order.
Only the standard library is used, so the trainer image needs no HTTP client package.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence

from loraplex_api.experiment import HTTPReward as HTTPRewardSpec

from .base import RewardError, Sample, check_rewards, user_row

_BODY_EXCERPT = 200


class HTTPRewardClient:
    """POSTs each batch to ``url`` and checks the reply; every failure is a RewardError naming the URL."""

    def __init__(self, url: str, *, timeout_seconds: float, where: str, answer_field: str = "answer") -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        self._where = where
        self._answer_field = answer_field

    def _fail(self, message: str) -> RewardError:
        return RewardError(f"{self._where}: POST {self.url}: {message}")

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        """Score a batch with one request."""
        if not samples:
            return []
        payload = {
            "samples": [
                {"prompt": s.prompt, "completion": s.completion, "row": user_row(s.row, self._answer_field)}
                for s in samples
            ]
        }
        try:
            body = json.dumps(payload).encode()
        except TypeError as error:
            raise self._fail(f"cannot encode the samples as JSON: {error}") from None
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            excerpt = error.read()[:_BODY_EXCERPT].decode(errors="replace")
            raise self._fail(f"status {error.code} {error.reason}: {excerpt}") from None
        except TimeoutError:
            raise self._fail(f"no reply within {self.timeout_seconds:g}s") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise self._fail(f"no reply within {self.timeout_seconds:g}s") from None
            raise self._fail(f"{error.reason}") from None
        except OSError as error:  # connection reset mid-body and the like
            raise self._fail(str(error)) from None
        try:
            reply = json.loads(raw)
        except ValueError:
            excerpt = raw[:_BODY_EXCERPT].decode(errors="replace")
            raise self._fail(f"reply is not JSON: {excerpt!r}") from None
        if not isinstance(reply, dict) or "rewards" not in reply:
            raise self._fail('reply has no "rewards" list; expected {"rewards": [float, ...]}')
        return check_rewards(reply["rewards"], len(samples), f"{self._where}: POST {self.url}")

    def close(self) -> None:
        """Nothing held between requests."""


def build_http(spec: HTTPRewardSpec, *, where: str, answer_field: str) -> HTTPRewardClient:
    """An HTTP reward for ``spec.url``."""
    return HTTPRewardClient(
        spec.url, timeout_seconds=spec.timeout_seconds, where=where, answer_field=answer_field
    )
