// How many descriptors this process has open (/proc/self/fd), for tests that prove nothing leaks.
#ifndef DMAPIN_TESTING_OPEN_FDS_H_
#define DMAPIN_TESTING_OPEN_FDS_H_

namespace dmapin::harness {

// The entries of /proc/self/fd but the directory's own descriptor; -1 if it cannot be read.
int CountOpenFds();

}  // namespace dmapin::harness

#endif  // DMAPIN_TESTING_OPEN_FDS_H_
