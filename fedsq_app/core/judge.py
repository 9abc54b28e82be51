"""The reply judge: the server's validation loss decides whether a suspect reply stays in the round.

A reply is suspect when its update points against the round's median update (cosine < −τ of the direction
check, ``core/replies.alignments``) or lies beyond the deviation bound (it had to be scaled). Either can be an
attack (IPM, min-max, a reversed or inflated update) or an honest silo whose data differs from the others'
(a one-class silo under label skew, a large silo taking more steps). The geometry alone cannot tell them
apart; what the reply does to the round can. Each suspect is left out of the round's aggregate once
(leave-one-out): if the aggregate without it has a lower loss on the server's validation split than the
aggregate with every reply, it is rejected; otherwise it stays as the bounds left it. A reply that agrees
with the round and lies within the bound is never judged: an honest round costs one evaluation per suspect,
plus one, and none when nothing is suspect. Rounds of fewer than 3 accepted replies are not judged.

Pure given ``loss_of`` (the caller's aggregate-then-evaluate); raises only what ``loss_of`` raises.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from fedsq_app.core.defenses import MIN_REPLIES_FOR_MEDIAN
from fedsq_app.core.replies import ReplyOutcome, RoundReplies

VALIDATION_JUDGE = "validation"  # the default; "repeat": rejected when the node's previous reply was opposed too
REPLY_JUDGES = (VALIDATION_JUDGE, "repeat")


def suspicion(outcome: ReplyOutcome, tau: float) -> str:
    """Why an accepted reply is judged ("" if it is not): pointing against the round, or bounded."""
    if not outcome.accepted:
        return ""
    if outcome.alignment is not None and outcome.alignment < -tau:
        return f"its update points against the round's median update (cosine {outcome.alignment:.3f})"
    if outcome.clip_scale is not None and outcome.clip_scale < 1:
        return f"its update lay beyond the round's bound (scaled by {outcome.clip_scale:.3g})"
    return ""


def worse_with(base: float, without: float) -> bool:
    """Whether the round is worse with a reply (loss ``base``) than without it (``without``): a non-finite loss
    counts as the worst."""
    if not math.isfinite(without):
        return False
    return not math.isfinite(base) or without < base


def judge_replies(checked: RoundReplies, tau: float,
                  loss_of: Callable[[list], float]) -> tuple[RoundReplies, dict[int, list[float]]]:
    """(``checked`` with each suspect reply the round is better without moved to the rejected, what was judged:
    {node id: [loss with every reply, loss without this one]}). ``loss_of(replies)``: the server's validation
    loss of those accepted replies' aggregate. From 3 accepted replies: below, a rejection could only fail the
    round closed (two-reply rounds keep their norm clip)."""
    suspects = {o.node_id: why for o in checked.outcomes if (why := suspicion(o, tau))}
    if not suspects or len(checked.accepted) < MIN_REPLIES_FOR_MEDIAN:
        return checked, {}
    base = loss_of(checked.accepted)
    judged, dropped = {}, {}
    for node_id, why in suspects.items():
        without = loss_of([r for r in checked.accepted if r.node_id != node_id])
        judged[node_id] = [base, without]
        if worse_with(base, without):
            dropped[node_id] = (f"{why}, and the round's aggregate without it has a lower loss on the server's "
                                f"validation split ({without:.4g} against {base:.4g})")
    if not dropped:
        return checked, judged
    outcomes = [replace(o, accepted=False, reason=dropped[o.node_id], clip_scale=None, bn_clamped=None,
                        update_norm=None, deviation=None) if o.accepted and o.node_id in dropped else o
                for o in checked.outcomes]
    return replace(checked, accepted=[r for r in checked.accepted if r.node_id not in dropped],
                   rejected=checked.rejected + list(dropped.items()), outcomes=outcomes), judged
