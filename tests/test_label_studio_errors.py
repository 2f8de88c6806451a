"""Which Label Studio refusals mean "a task of this write was deleted meanwhile" (the deliverer then forgets
those tasks and writes the others). The texts are Label Studio 1.23.2's (`data_import/api.py`), for each of
its prediction-import paths; the e2e tests see the default one through a real Label Studio. And a listing
whose annotations came without their results (a Label Studio that ignored `expand`) is refused, not read as
annotations without choices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from label_studio_sdk.core.api_error import ApiError

from worker.label_studio import _task, missing_task_error

ITEM = "{'task': 41, 'model_version': 'v1', 'result': []}"


def refusal(message: str, status: int = 400) -> ApiError:
    body = {"detail": "Validation error", "validation_errors": {"non_field_errors": [message]}, "status_code": status}
    return ApiError(status_code=status, body=body)


@pytest.mark.parametrize(
    "message",
    [
        # the default path
        f'{ITEM} contains invalid "task" field: corresponding task ID couldn\'t be retrieved from project 3 tasks',
        # fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short (recommended in the README)
        f'{ITEM} contains invalid "task" field: task ID 41 not found in project 3',
        # fflag_feat_utc_210_prediction_validation_15082025
        "Prediction 0: Invalid task ID 41 - task not found in project",
    ],
)
def test_a_deleted_task_is_recognised_on_every_import_path(message):
    assert missing_task_error(refusal(message))


def test_other_refusals_are_not_taken_for_a_deleted_task():
    assert not missing_task_error(refusal('Prediction 0: choice "Detritus" is not in the label config'))
    assert not missing_task_error(refusal("task not found in project", status=500))
    assert not missing_task_error(RuntimeError("couldn't be retrieved"))


def test_annotations_listed_without_their_results_are_refused():
    whole = {"id": 1, "result": [], "was_cancelled": False}
    assert _task(SimpleNamespace(id=3, data={"image": "x"}, annotations=[whole])).annotations == [whole]
    with pytest.raises(ValueError, match="task 3's annotations without their results"):
        _task(SimpleNamespace(id=3, data={"image": "x"}, annotations=[whole, {"id": 2}]))
