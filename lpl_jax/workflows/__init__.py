"""Multi-stage runs composed of the library's pieces: `miniature`, the paper's experiment at toy scale on a CPU
(`make demo`)."""
