package main

import "sort"

// extent is a half-open range [start, end) of CBT blocks.
type extent struct {
	start, end int64
}

// extentSet is a sorted list of disjoint extents.  Touching extents are
// merged, so a set has one canonical form and two sets with the same blocks
// compare equal element by element.
//
// Sets are treated as values: every operation returns a new slice and never
// modifies its receiver, so a set recorded at snapshot time can be shared
// without copying.
type extentSet []extent

// add returns s with the blocks [start, end) added.
func (s extentSet) add(start, end int64) extentSet {
	if start >= end {
		return s
	}
	// The first extent that overlaps or touches [start, end).
	i := sort.Search(len(s), func(k int) bool { return s[k].end >= start })
	j := i
	for j < len(s) && s[j].start <= end {
		if s[j].start < start {
			start = s[j].start
		}
		if s[j].end > end {
			end = s[j].end
		}
		j++
	}
	out := make(extentSet, 0, len(s)-(j-i)+1)
	out = append(out, s[:i]...)
	out = append(out, extent{start, end})
	return append(out, s[j:]...)
}

// union returns the blocks in s or in o.
func (s extentSet) union(o extentSet) extentSet {
	out := s
	for _, e := range o {
		out = out.add(e.start, e.end)
	}
	return out
}

// blocks is the number of blocks in the set.
func (s extentSet) blocks() int64 {
	var n int64
	for _, e := range s {
		n += e.end - e.start
	}
	return n
}

// byteRange is a half-open byte range [Start, Start+Length) as the SOAP and
// control answers report it.
type byteRange struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
}

// bytesWithin converts the set to byte ranges, clipped to [lo, hi): the last
// block of a disk whose capacity is not a multiple of the block size is
// partial, and a query may start in the middle of a block.
func (s extentSet) bytesWithin(blockSize, lo, hi int64) []byteRange {
	out := []byteRange{}
	for _, e := range s {
		start, end := e.start*blockSize, e.end*blockSize
		if start < lo {
			start = lo
		}
		if end > hi {
			end = hi
		}
		if start < end {
			out = append(out, byteRange{Start: start, Length: end - start})
		}
	}
	return out
}

// blockSpan is the range of blocks touched by the bytes [offset, offset+length).
func blockSpan(blockSize, offset, length int64) (int64, int64) {
	return offset / blockSize, (offset + length + blockSize - 1) / blockSize
}
