"""``fedsq-perf screen``: what the server's screening of one round costs (``core/replies.screen_replies``:
validation, the direction check, the deviation bound, the BN clamp) on replies shaped like a real model's.
The coordinate-wise median update is its costliest step, a sort per coordinate over the replies."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedsq_app.core import wire
from fedsq_app.core.replies import screen_replies
from fedsq_app.runtime.models import build_model


def _reply(arrays: dict[str, np.ndarray], node_id: int) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                        message_type="train")
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 100, "train_loss": 0.5})})
    return Message(content=content, metadata=metadata)


def main(args) -> None:
    """Seconds per round (the fastest of ``--repeats``) for ``--replies`` replies of ``--model``, with the
    direction check off and at its default."""
    state = build_model(args.model, 10).state_dict()
    template = {k: v.numpy() for k, v in state.items()}
    rng = np.random.default_rng(0)
    replies = [_reply({k: (v + rng.normal(0.001, 0.01, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
                       for k, v in template.items()}, n) for n in range(1, args.replies + 1)]
    parameters = sum(v.size for v in template.values())
    print(f"| model | parameters | replies | direction check | seconds per round (fastest of {args.repeats}) |")
    print("|---|---|---|---|---|")
    for tau in (0.0, 0.2):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            checked = screen_replies(replies, template, opposition=tau)
            times.append(time.perf_counter() - start)
        assert len(checked.accepted) == args.replies, checked.rejected
        print(f"| {args.model} | {parameters / 1e6:.1f} M | {args.replies} | {tau} | {min(times):.2f} |", flush=True)
