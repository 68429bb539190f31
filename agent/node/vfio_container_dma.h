// The VFIO backends' ContainerDma: every change goes to the registry and to the kernel's container
// (agent/vfio), in the order that keeps the spec:
//   - the registry's checks come before any kernel call: the kernel must not pin (or try to pin),
//     or unmap, what the registry then refuses, since that could not be undone;
//   - a register goes to the kernel first (undoing it is a plain unregister), an unregister to the
//     registry first (it answers the EBUSY of spec §3.4, which Linux 5.1+ no longer does);
//   - a map goes to the registry first (it checks the range is registered, spec §7.4), an unmap to
//     the kernel first (the device must not reach pages the registry may release).
// A kernel call that fails after the registry changed is undone in the registry; an undo that
// fails too is counted in `kernel_inconsistencies` (the registry and the kernel disagree).
#ifndef DMAPIN_AGENT_NODE_VFIO_CONTAINER_DMA_H_
#define DMAPIN_AGENT_NODE_VFIO_CONTAINER_DMA_H_

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "agent/node/container_dma.h"
#include "agent/node/guest_address_backend.h"
#include "agent/registry/registry.h"
#include "agent/vfio/vfio_container.h"

namespace dmapin::agent {

// Creates container `id` in the registry over the open `driver`, whose DMA window `options` must
// be. `kernel_inconsistencies` must outlive the result. On failure `driver` is closed.
// `translator` (may be null: addresses are the agent's; else it must outlive the result) gives
// the agent's addresses of a context's memory, which is what the kernel's calls take.
absl::StatusOr<std::unique_ptr<ContainerDma>> NewVfioContainerDma(
    Registry& registry, ContainerId id, const ContainerOptions& options,
    std::unique_ptr<VfioContainerDriver> driver, std::atomic<uint64_t>* kernel_inconsistencies,
    const AddressTranslator* translator = nullptr);

// The same for a container recovered after a restart whose VMM holds it (handed off): the kernel
// still has its mappings, so nothing is opened; `closed_driver` takes the container back when the
// VMM gives its descriptor (ContainerDma::Adopt). The window is the recorded one (`options`),
// which Adopt checks against the kernel's.
absl::StatusOr<std::unique_ptr<ContainerDma>> NewAdoptableVfioContainerDma(
    Registry& registry, ContainerId id, const ContainerOptions& options,
    std::unique_ptr<VfioContainerDriver> closed_driver,
    std::atomic<uint64_t>* kernel_inconsistencies, const AddressTranslator* translator);

}  // namespace dmapin::agent

#endif  // DMAPIN_AGENT_NODE_VFIO_CONTAINER_DMA_H_
