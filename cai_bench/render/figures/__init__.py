"""The figures, one family a module, built with matplotlib's object interface (no pyplot), so they can be made in
tests and in threads; the one global setting is made once, here. Our series are solid lines; the paper's are
dashed and grey-blue, each labelled with the kind of time it is, never blended in."""

import matplotlib

# Text from records and files (a host, a CPU model, a run id) is data, never TeX: a "$" or a "\" in it is drawn as
# it is, where mathtext would fail the whole figure (an unknown macro) or recurse without end ("$\sqrt{" nested)
matplotlib.rcParams["text.parse_math"] = False
