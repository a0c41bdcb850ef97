from moeshard_compile.demo import main

main()
