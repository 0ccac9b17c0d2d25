"""The figures, one family a module, built with matplotlib's object interface (no pyplot, no global state), so
they can be made in tests and in threads. Our series are solid lines; the paper's are dashed and grey-blue, each
labelled with the kind of time it is, never blended in."""
