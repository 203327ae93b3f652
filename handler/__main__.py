from handler.worker import main

main()
