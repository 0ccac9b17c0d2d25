"""What the records mean: queries over the store, reports of measured points, comparisons, validity,
estimates at scale and the decisions they support, the paper's published figures."""
