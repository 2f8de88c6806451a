"""Queue and task names shared by the API (which sends) and the workers (which run)."""

INTERACTIVE = "interactive"
BULK = "bulk"

PREDICT_TASKS = "plankton.predict_tasks"
FAN_OUT = "plankton.fan_out"
DELIVER = "plankton.deliver"
REFIT = "plankton.refit"
REPREDICT = "plankton.repredict"
