"""Standard Webhooks signatures, as the spec's example and its reference library have them."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from app.webhooks import signing


def test_the_signature_of_the_specs_example() -> None:
    # The example of the Standard Webhooks spec (and Svix's docs).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    signature = signing.signature(
        secret, webhook_id="msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp=1614265330,
        body=b'{"test": 2432232314}',
    )  # fmt: skip
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signed_headers_verify_with_the_reference_library_and_fail_when_tampered() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_") and signing.new_secret() != secret
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    body = b'{"type":"job.succeeded"}'
    headers = signing.signed_headers(
        secret, webhook_id="msg_1", timestamp=int(time.time()), body=body
    )
    assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": "msg_2"})
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
