from cai_bench.cli import main

# The guard matters: the hpc backend's worker processes are spawned, and a spawned child imports the parent's
# main module again; without it, each worker would run the command line anew.
if __name__ == "__main__":
    main()
