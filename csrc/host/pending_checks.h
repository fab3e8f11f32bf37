// Device-side checks whose verdict reaches the host later, without a sync.
//
// A CUDA op that would need a device-to-host copy to validate its data (the
// label values of upsample_cross_entropy) instead lets its kernel write a
// verdict flag, copies that flag asynchronously to pinned host memory and
// records an event after the copy. The check is pending until the event has
// completed; later calls poll (never block) and raise the failure of the
// earliest completed failed check. wait_all() blocks, for an explicit check.
//
// Torch- and CUDA-free, templated over the check, so the bookkeeping is unit
// tested without a GPU (tests/cuda_emulator/emulator.cpp drives it with a fake
// check). A Check is movable and has
//   bool ready();        // the verdict has arrived (non-blocking, e.g. cudaEventQuery)
//   void wait();         // block until it has (e.g. cudaEventSynchronize)
//   bool failed() const; // the verdict; only called once ready() or wait() returned
// Thread-safe: one mutex per list (the CUDA binding keeps one list per device).
#pragma once

#include <cstddef>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>

namespace fcnfast {

template <typename Check>
class PendingChecks {
 public:
  // At this many pending checks add() first waits for the oldest and drops it
  // when it passed (a failed one stays, for the next poll()), so the list and
  // the pinned flags it holds stay bounded when the host runs far ahead of the
  // device (in practice the driver's launch queue keeps it much closer).
  static constexpr std::size_t kMaxPending = 1024;

  void add(Check check) {
    std::lock_guard<std::mutex> lock(mu_);
    if (pending_.size() >= kMaxPending) {
      pending_.front().wait();
      if (!pending_.front().failed()) pending_.pop_front();
    }
    pending_.push_back(std::move(check));
  }

  // Removes every check whose verdict has arrived; returns the earliest added
  // failed one among them (a later failure found at the same time is dropped:
  // one error is raised for them). Never blocks.
  std::optional<Check> poll() {
    std::lock_guard<std::mutex> lock(mu_);
    std::optional<Check> first;
    std::deque<Check> kept;
    for (auto& c : pending_) {
      if (!c.ready()) {
        kept.push_back(std::move(c));
      } else if (!first && c.failed()) {
        first.emplace(std::move(c));
      }
    }
    pending_.swap(kept);
    return first;
  }

  // Waits for every pending check, removes them all and returns the earliest
  // failed one, as poll().
  std::optional<Check> wait_all() {
    std::deque<Check> all;
    {
      // wait outside the lock: other threads keep launching and polling meanwhile
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(pending_);
    }
    std::optional<Check> first;
    for (auto& c : all) {
      c.wait();
      if (!first && c.failed()) first.emplace(std::move(c));
    }
    return first;
  }

  std::size_t size() const {
    std::lock_guard<std::mutex> lock(mu_);
    return pending_.size();
  }

 private:
  mutable std::mutex mu_;
  std::deque<Check> pending_;
};

}  // namespace fcnfast
