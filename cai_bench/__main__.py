from cai_bench.cli import main

main()
