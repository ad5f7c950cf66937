"""Run guards: stop requests, the step watchdog, the run lock."""
