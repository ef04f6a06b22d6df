//go:build tools

// Package tools pins the Karpenter kwok command that build.sh compiles.
package tools

import _ "sigs.k8s.io/karpenter/kwok"
