"""Running a suite: the worker (one run in its own process), the one model builder, the fork server, the
pre-flight (data checks and the configuration probe), and the sweep (plan, run, store) the CLI renders."""
