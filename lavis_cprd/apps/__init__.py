"""The applications built on the library: the CLI, demo, compare, diagnose, serving, the teacher-cache command, reports."""
