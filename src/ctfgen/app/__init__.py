"""The front ends: the command line (`cli`, one module per command in `commands`), the web demo
(`demo`), the benchmark, sample sets and figures."""
