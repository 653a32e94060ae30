"""Exit codes of `python -m speedx.generate` (and its `merge`), listed in its --help."""

OK = 0  # every example slot filled
FAILED = 1  # an unexpected error (a traceback says where)
BAD_INPUT = 2  # bad arguments or files: the message says what to fix; nothing of the run was written
INCOMPLETE = 3  # the run finished, but some slots found no valid example: the summary says how to fill them
INTERRUPTED = 130  # Ctrl-C: re-run the same command to resume

HELP = f"""exit codes:
  {OK}    complete: every example slot filled
  {FAILED}    failed: an unexpected error (see the traceback); re-run the command to resume
  {BAD_INPUT}    bad input: the message says what to fix; the run was not started
  {INCOMPLETE}    incomplete: finished with empty slots; the summary says how to fill them
  {INTERRUPTED}  interrupted (Ctrl-C); re-run the same command to resume"""
