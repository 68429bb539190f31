// ThreadSanitizer suppressions for the tests of this package (--config=tsan).
//
// Debian's gRPC, protobuf and Abseil are not built with -fsanitize=thread: TSan cannot see the
// ordering their atomics provide, so every message handed between gRPC's threads and ours is
// reported (thousands of reports per run, each with gRPC, protobuf or Abseil frames in the racing
// stacks). Only those are suppressed: a race whose stacks stay in our own code is still reported.
extern "C" const char* __tsan_default_suppressions() {
  return "race:libgrpc\n"
         "race:libgpr\n"
         "race:libupb\n"
         "race:libprotobuf\n"
         "race:libabsl_\n"
         "race:grpc::\n"
         "race:grpc_\n"
         "race:google::protobuf\n"
         // The generated message and stub code (//api:*_cc_grpc), called back by gRPC.
         "race:_Ucc_Ugrpc.so\n";
}
