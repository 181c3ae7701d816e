"""One registration pipeline, for every cloud: plan → record → store and register → undo.

    done = register_part(backend, request, open_source, hooks=JobHooks(...), reusable=...)

The SOAP service and `install-image` both register through here; the cloud is a
`registrar.clouds.Backend`. The steps:

1. `backend.plan` names where the image's objects will go (a bundle folder, an image name).
2. `hooks.placed(placement)` records it before anything is made (the service writes it into the
   registry's job row), so whatever a crash leaves can be found and removed.
3. `backend.register` stores and registers the image and waits until it is usable; it says
   when it first writes to the cloud, and calls `hooks.registered(id)` as soon as the cloud has
   named the image.
4. On any failure after that first write, `backend.undo` removes what the job made, and the
   original error is raised. (A failure before it, such as refused credentials at the bucket
   check, made nothing to remove.) If the undo itself fails, the undo's failure is noted on the
   original error and `hooks.abandoned(error)` is called: the service marks the job for the
   next start to clean up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence

from registrar.clouds import Backend, OpenSource, PartRequest, Placement, Progress, Registered
from registrar.errors import CloudError

log = logging.getLogger(__name__)


def no_hook(*_args: object) -> None:
    """The default of every hook: do nothing."""


@dataclasses.dataclass(frozen=True)
class JobHooks:
    """Callbacks for the job's bookkeeping; each defaults to doing nothing."""

    placed: Callable[[Placement], None] = no_hook
    registered: Callable[[str], None] = no_hook
    abandoned: Callable[[CloudError], None] = no_hook
    sending: Callable[[], None] = no_hook  # the cloud has begun to take the bytes


def register_part(
    backend: Backend,
    request: PartRequest,
    open_source: OpenSource,
    *,
    hooks: JobHooks = JobHooks(),  # noqa: B008 - immutable
    reusable: Sequence[Placement] = (),
    slot: contextlib.AbstractContextManager[object] | None = None,
    progress: Progress | None = None,
) -> tuple[Registered, Placement]:
    """Register one image with `backend`; on failure, leave nothing behind and raise."""
    placement = backend.plan(request, reusable)
    hooks.placed(placement)
    image_ids: list[str] = []
    started: list[bool] = []

    def on_id(image_id: str) -> None:
        image_ids.append(image_id)
        hooks.registered(image_id)

    try:
        done = backend.register(
            open_source,
            request,
            placement,
            on_start=lambda: started.append(True),
            on_id=on_id,
            slot=slot if slot is not None else contextlib.nullcontext(),
            progress=progress,
            on_sending=hooks.sending,
        )
    except BaseException as exc:
        if started or image_ids:
            _undo(backend, placement, image_ids[-1] if image_ids else None, exc, hooks)
        raise
    return done, placement


def _undo(
    backend: Backend,
    placement: Placement,
    image_id: str | None,
    cause: BaseException,
    hooks: JobHooks,
) -> None:
    """Remove what a failed job made; a failure to do so never masks the original error."""
    try:
        backend.undo(placement, image_id)
    except CloudError as exc:
        # Not logged here: the caller says it once (the service, with what happens next).
        cause.add_note(f"cleanup failed too: {exc}")
        hooks.abandoned(exc)
        return
    log.info(
        "cleaned up %s%s after: %s",
        placement.manifest or placement.folder,
        f" and {image_id}" if image_id else "",
        cause,
    )
